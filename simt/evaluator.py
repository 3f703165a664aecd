"""Meta-test evaluation: the same seeded episodes for every model, per-episode scores, mean and 95% CI."""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from simt import allocator

if TYPE_CHECKING:  # annotations only: simt.data imports this module (Metric), so a real import would be circular
    from simt.algorithms.inner_loop import Params
    from simt.data.tasks import Task

log = logging.getLogger(__name__)


def accuracy_values(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy in percent of every episode of a stack: (..., N, C) logits, (..., N) labels -> (...,)
    float64, on the outputs' device (no host sync)."""
    return (outputs.argmax(dim=-1) == targets).float().mean(dim=-1).double() * 100.0


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return accuracy_values(outputs, targets).item()


@dataclass(frozen=True)
class Metric:
    """What a data set is scored by: `fn(outputs, targets) -> float` per episode, its name in results
    (`test/<name>`), and whether higher is better (which also sets the sweep direction).

    `values`, when given, computes the same numbers for a stack of episodes (leading dimensions) as a
    tensor: scoring a chunk of episodes then reads them from the device once, not once per episode (each
    read waits for the GPU to finish everything queued before it)."""

    fn: Callable[[torch.Tensor, torch.Tensor], float]
    name: str
    higher_is_better: bool
    values: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def scores(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> list[float]:
        """One score per episode."""
        if self.values is None or len(outputs) == 1:
            return [self.fn(out, target) for out, target in zip(outputs, targets)]
        return self.values(torch.stack(list(outputs)), torch.stack(list(targets))).tolist()

    def total(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The sum of the scores of a stack of episodes (leading dimension) as a 0-dim float64 tensor, left on
        the device where `values` allows."""
        if self.values is not None:
            return self.values(outputs, targets).sum()
        return torch.tensor(sum(self.fn(out, target) for out, target in zip(outputs, targets)), dtype=torch.float64,
                            device=outputs.device)


ACCURACY = Metric(accuracy, "acc", higher_is_better=True, values=accuracy_values)


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% interval, 1.96·s/√n (s with n-1)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 episodes, got {n}")
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(variance / n)


def evaluate(learner, models: dict[str, Params], episodes: Iterable[Task], device: torch.device,
             metric: Metric = ACCURACY, total: int | None = None, desc: str = "eval",
             progress: bool = False, batch_size: int = 1) -> dict[str, list[float]]:
    """Score every model in `models` (name -> params) on every episode; returns name -> per-episode scores.

    All models see exactly the same episodes, so their per-episode scores can be compared pairwise.
    `batch_size` > 1 adapts and scores that many episodes at once (engines.batched_eval_outputs, as the
    batched engine runs a meta-batch): the same scores, faster where one episode's kernels are too small to
    fill the device (a GPU); at most as many as keep every activation within MAX_TENSOR_ELEMENTS.
    A chunk that runs out of GPU memory is retried in halves, and later chunks keep the smaller size.
    """
    if batch_size < 1:
        raise ValueError(f"trainer.eval_batch={batch_size}: expected a positive number of episodes")
    scores: dict[str, list[float]] = {name: [] for name in models}
    if total is None and isinstance(episodes, Sized):  # as tqdm does for a plain loop
        total = len(episodes)
    episodes, queue = iter(episodes), []  # queue: episodes taken from `episodes`, not scored yet
    capped = batch_size == 1  # the chunk size is checked against the largest tensor it makes once, at the first chunk
    # trainer.keep_freed_memory (CPU runs): evaluation hands kept memory back, and batches run without keeping it
    with allocator.evaluation(batched=batch_size > 1), \
            tqdm(total=total, desc=desc, leave=False, disable=not progress) as bar:
        while True:
            queue += [task.to(device) for task in itertools.islice(episodes, max(0, batch_size - len(queue)))]
            if not queue:
                break
            if not capped:
                capped, batch_size = True, min(batch_size, largest_chunk(learner.model, queue[0], batch_size, desc))
            chunk = queue[:batch_size]
            try:
                outputs = {name: _outputs(learner, params, chunk) for name, params in models.items()}
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                batch_size = (len(chunk) + 1) // 2
                log.warning("%s: out of memory with %d episodes at once, going on with %d", desc, len(chunk),
                            batch_size)
                continue
            del queue[:len(chunk)]
            for name, outs in outputs.items():
                scores[name].extend(metric.scores(outs, [task.query_y for task in chunk]))
            bar.update(len(chunk))
    return scores


# The most elements one activation tensor may hold: cuDNN indexes tensors with 32-bit integers and refuses
# larger ones (CUDNN_STATUS_NOT_SUPPORTED, seen on an H100 batching 100 Conv4-64 episodes of 80 84x84 images).
MAX_TENSOR_ELEMENTS = 2**31 - 1


def largest_chunk(model: torch.nn.Module, task: Task, wanted: int, desc: str = "eval") -> int:
    """The most episodes like `task` (at most `wanted`) that one batched chunk may hold: the chunk's
    images pass through each layer as one tensor (folded, one batch, or under vmap), so the widest
    activation of one image times the images of a chunk must stay within MAX_TENSOR_ELEMENTS."""
    widest = widest_activation(model, task.query_x[:2])
    per_episode = widest * max(len(task.support_x), len(task.query_x))  # support and query pass separately
    most = max(1, MAX_TENSOR_ELEMENTS // per_episode)
    if most < wanted:
        log.info("%s: %d episodes at once (not %d): one activation of %d would exceed %d elements", desc, most,
                 wanted, wanted, MAX_TENSOR_ELEMENTS)
    return min(wanted, most)


def widest_activation(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Elements per image of the largest output of any layer of `model`, measured on a few `images` in eval
    mode (no running statistic is updated, no dropout drawn)."""
    widest = [images[0].numel()]

    def record(module, inputs, output):
        if isinstance(output, torch.Tensor):
            widest[0] = max(widest[0], output.numel() // len(images))

    hooks = [module.register_forward_hook(record) for module in model.modules()]
    modes = [(module, module.training) for module in model.modules()]  # dropout may be off in a training model
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for module, training in modes:
            module.training = training
        for hook in hooks:
            hook.remove()
    return widest[0]


def _outputs(learner, params: Params, tasks: list[Task]) -> list[torch.Tensor]:
    """The models' query outputs on `tasks`: the learner's own per-episode code for one task, the same code
    on the tasks stacked into one for more (engines.batched_eval_outputs)."""
    if len(tasks) == 1:
        return [learner.eval_outputs(params, tasks[0])]
    # Deferred: simt.algorithms imports simt.data, which imports this module (Metric): a cycle at import time.
    from simt.algorithms.engines import batched_eval_outputs

    shapes = {tuple(tuple(t.shape) for t in (task.support_x, task.support_y, task.query_x, task.query_y))
              for task in tasks}
    if len(shapes) > 1:
        raise ValueError(f"trainer.eval_batch={len(tasks)}: the episodes of a chunk must have equal shapes (same "
                         f"ways, shots, queries); got (support_x, support_y, query_x, query_y) shapes {sorted(shapes)}")
    return batched_eval_outputs(learner, params, tasks)


def summarize(scores: dict[str, list[float]], metric_name: str = "acc") -> dict[str, float]:
    """name -> per-episode scores  ==>  {"<name>/<metric>": mean, "<name>/<metric>_ci95": half-width}."""
    summary = {}
    for name, values in scores.items():
        mean, ci = mean_ci95(values)
        summary[f"{name}/{metric_name}"] = mean
        summary[f"{name}/{metric_name}_ci95"] = ci
    return summary
