"""A loss summed over a stack of tasks (leading task dimension), in one call where the loss allows it.

The batched engine runs a meta-batch's tasks as one stack, and a GPU step is bound by the ops it dispatches:
the sum of T task losses is then one loss call on the T tasks' samples together, not T calls, for every loss
that is a mean over its samples (F.cross_entropy, F.mse_loss; a function of ours says so with
`loss.mean_over_samples = True`): 3 ops, where a vmap over the tasks takes 18. Any other loss runs under vmap.
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F

MEAN_OVER_SAMPLES = (F.cross_entropy, F.mse_loss)


def sum_over_tasks(loss_fn: Callable[..., torch.Tensor], outputs: torch.Tensor, targets: torch.Tensor,
                   **kwargs) -> torch.Tensor:
    """The sum over a stack of tasks (leading dimension) of loss_fn(task outputs, task targets, **kwargs).

    Every task of a stack has as many samples (stacking requires it), so for a mean over samples the sum of
    the task means is `count` times the mean of all. `kwargs` must not change that (a `weight`, `ignore_index`
    or `reduction` would): ours pass only the distillation temperature.
    """
    count = len(outputs)
    if loss_fn in MEAN_OVER_SAMPLES or getattr(loss_fn, "mean_over_samples", False):
        mean = loss_fn(outputs.flatten(0, 1), targets.flatten(0, 1), **kwargs)
        return mean if count == 1 else mean * count
    if count == 1:
        return loss_fn(outputs[0], targets[0], **kwargs)
    return torch.func.vmap(lambda task_outputs, task_targets: loss_fn(task_outputs, task_targets, **kwargs))(
        outputs, targets).sum()
