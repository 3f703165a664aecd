"""Engines: how the tasks of a meta-batch are run (the `algo.engine` key). All give the same meta-gradient.

- `loop`: one task after another, inner gradients by torch.autograd.grad. The reference.
- `higher`: the same loop with the inner SGD done by the `higher` library (an independent implementation).
- `batched`: all tasks at once. On a GPU the loop is bound by kernel launches (tiny per-task kernels, one
  Python dispatch each); here each kernel does T tasks' work. Gradient learners run their per-task code
  once on a stacked task (`TaskBatch`): the adapted weights get a leading task dimension, every forward
  pass is torch.func.vmap over it, and the inner gradients are taken by torch.autograd.grad outside vmap
  (the tasks are independent, so the gradient of the summed support losses is each task's own). Only the
  forward passes pay vmap's per-op overhead; the backward passes are plain batched kernels. (vmap over
  the whole task with torch.func.grad inside, the first version, dispatched about as many ops as the
  loop: 11,500 against 12,400 for a Conv4 MAML + SiMT forward of 4 tasks.) ProtoNet, with no inner loop,
  runs its whole task under vmap. BatchNorm runs as `ExactBatchNorm2d` meanwhile (simt.models.batch_norm
  says why), and dropout draws a different mask for every task (vmap's randomness="different").
- `auto`: `resolve_engine` picks one from the device.

Every engine runs the same per-task code (`_task_outputs`: the learner's student and teacher outputs).
The losses and statistics built from the outputs (simt.trainer.meta_batch_loss) are therefore one
implementation for all engines.
"""
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from simt.algorithms.inner_loop import InnerStep, Params, higher_sgd_step, sgd_step
from simt.data.tasks import Task
from simt.models.batch_norm import RunningStatistics, exact_batch_norm
from simt.models.task_folding import fold, folded_tasks, unfold

INNER_STEPS: dict[str, InnerStep] = {"loop": sgd_step, "batched": sgd_step, "higher": higher_sgd_step}
ENGINES = ("auto", *INNER_STEPS)
LABELS = ("support_y", "query_y")


def resolve_engine(engine: str, device: torch.device) -> str:
    """The engine `auto` stands for on `device`; any other valid name is returned as it is.

    CPU: `loop`, the faster of the two in `make bench` on this project's 2-core machines (benchmarks/results/:
    batching only adds work where kernels are compute-bound). CUDA: `batched`, because the loop is bound by
    dispatching kernels there: on an H100 it was the fastest engine in nearly every row
    (benchmarks/results/2026-11-26-cuda-h100.md).
    """
    if engine not in ENGINES:
        raise ValueError(f"algo.engine={engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "batched" if torch.device(device).type == "cuda" else "loop"
    return engine


def meta_batch_outputs(learner, theta: Params, target,
                       tasks: list[Task]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per task, (student query outputs, teacher query outputs or None without a momentum target).

    `learner.engine` (a resolved name) chooses how: task by task, or all tasks at once.
    """
    if learner.engine != "batched":
        return [_task_outputs(learner, theta, target, task) for task in tasks]
    if hasattr(learner, "tasks_at_once"):  # gradient learners: one stacked task
        with _tasks_at_once(learner, tasks) as stacked:
            student, teacher = _task_outputs(learner, theta, target, stacked)
        return list(zip(student.unbind(0), teacher.unbind(0) if teacher is not None else [None] * len(tasks)))

    def one_task(task: Task):
        student, teacher = _task_outputs(learner, theta, target, task)
        return (student,) if teacher is None else (student, teacher)

    outputs = _vmap_over_tasks(learner, one_task, tasks, randomness="different")  # a dropout mask per task
    students = outputs[0].unbind(0)
    teachers = outputs[1].unbind(0) if target is not None else [None] * len(tasks)
    return list(zip(students, teachers))


def batched_eval_outputs(learner, params: Params, tasks: list[Task]) -> list[torch.Tensor]:
    """`learner.eval_outputs(params, task)` for every task of `tasks` (equal shapes), all at once.

    Why: test time scores thousands of episodes, each adapted on its own; one at a time, a GPU runs tiny,
    launch-bound kernels (as the per-task training loop does). The per-task code is the per-episode
    path's, run as the batched engine runs it, so the results are the same whatever `learner.engine` is
    (the inner step is autograd's, as the loop's, even for `higher`; BatchNorm is exact, and in eval mode,
    ProtoNet's, it is the same fused, running-statistics kernel). Evaluation needs no meta-gradient, so
    `params` enter detached: no graph back to θ is kept per task.
    """
    params = {key: value.detach() for key, value in params.items()}
    if hasattr(learner, "tasks_at_once"):
        with _tasks_at_once(learner, tasks) as stacked:
            return list(learner.eval_outputs(params, stacked, inner_step=sgd_step).unbind(0))
    # randomness="error": evaluation draws nothing random (dropout is off), so a random op would be a bug.
    outputs = _vmap_over_tasks(learner, lambda task: learner.eval_outputs(params, task), tasks, randomness="error")
    return list(outputs.unbind(0))


class TaskBatch:
    """How a gradient learner runs `count` stacked tasks at once (its `tasks_at_once` block).

    Every tensor of the stacked task has a leading task dimension, and so have the weights the inner loop
    adapts (`expand`: a view, so the meta-gradient of every task's copy flows back to the one θ); the
    weights it does not adapt stay single and are shared. `forward` runs the model on all tasks: folded
    into its channels (simt.models.task_folding) where the model allows it, else under vmap over the task
    dimension. `loss` sums the per-task losses, whose gradient with respect to the stacked weights is each
    task's own gradient (the tasks share nothing), so torch.autograd.grad runs on the sum as in the loop.
    """

    def __init__(self, count: int, model: nn.Module, statistics: RunningStatistics):
        self.count, self.model, self.statistics = count, model, statistics
        self._dims = {name: p.dim() for name, p in model.named_parameters()}

    def stacked(self, params: Params, keys: list[str]) -> Params:
        """`params` with one copy of each key of `keys` per task (leading dimension `count`)."""
        return {**params, **{key: params[key].expand(self.count, *params[key].shape) for key in keys
                             if params[key].dim() == self._dims[key]}}

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """(T, N, ...) inputs -> (T, N, outputs)."""
        if getattr(self.model, "folds_tasks", False):  # the model's layers are folded (_tasks_at_once)
            return unfold(functional_call(self.model, params, (fold(x),), strict=False), self.count)
        in_dims = {key: 0 if value.dim() > self._dims[key] else None for key, value in params.items()}
        start = len(self.statistics.values)  # BN running statistics recorded by this pass, returned out of vmap

        def one_task(task_params: Params, task_x: torch.Tensor):
            return functional_call(self.model, task_params, (task_x,), strict=False), self.statistics.values[start:]

        outputs, values = torch.func.vmap(one_task, in_dims=(in_dims, 0), randomness="different")(params, x)
        self.statistics.values[start:] = values
        return outputs

    def loss(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], outputs: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
        return torch.func.vmap(loss_fn)(outputs, targets).sum()


@contextmanager
def _tasks_at_once(learner, tasks: list[Task]) -> Iterator[Task]:
    """The tasks stacked into one Task (leading task dimension), while the learner runs them at once:
    the model's layers folded, or its BatchNorm exact for vmap; running statistics are applied afterwards,
    task by task as the loop would."""
    fields, _ = _stacked(tasks, share_labels=False)
    model = learner.model
    layers = folded_tasks(model, len(tasks)) if getattr(model, "folds_tasks", False) else exact_batch_norm(model)
    with layers as statistics, learner.tasks_at_once(TaskBatch(len(tasks), model, statistics)):
        yield Task(*fields)
    statistics.apply(statistics.values)


def _vmap_over_tasks(learner, one_task, tasks: list[Task], randomness: str):
    """`one_task(task)` for all `tasks` at once under vmap (outputs stacked over the tasks), with the model's
    BatchNorm exact meanwhile. BN running-statistic updates (ProtoNet's training passes) cannot happen inside
    vmap: each task's batch statistics are returned out of it and applied afterwards in the per-task order."""
    fields, in_dims = _stacked(tasks)
    with exact_batch_norm(learner.model) as statistics:
        outputs, values = torch.func.vmap(lambda *task_fields: (one_task(Task(*task_fields)), statistics.values),
                                          in_dims=in_dims, randomness=randomness)(*fields)
        statistics.apply(values)
    return outputs


def _task_outputs(learner, theta: Params, target, task: Task) -> tuple[torch.Tensor, torch.Tensor | None]:
    student = learner.student_outputs(theta, task)
    return student, learner.teacher_outputs(target.params, task) if target is not None else None


def _stacked(tasks: list[Task], share_labels: bool = True) -> tuple[list[torch.Tensor], tuple[int | None, ...]]:
    """Task fields stacked over the tasks, (tasks, ...), and vmap's in_dims for them.

    With `share_labels`, labels that every task shares (the sampler numbers the classes of each task
    0..ways-1 in order) enter unbatched: label-dependent sizes, such as ProtoNet's class count, then stay
    plain numbers under vmap.
    """
    fields, in_dims = [], []
    for field in dataclasses.fields(Task):
        parts = [getattr(task, field.name) for task in tasks]
        if share_labels and field.name in LABELS and all(torch.equal(parts[0], part) for part in parts[1:]):
            fields.append(parts[0])
            in_dims.append(None)
            continue
        if len({part.shape for part in parts}) > 1:
            raise ValueError(f"algo.engine=batched: the tasks of a meta-batch must have equal shapes (same ways, "
                             f"shots, queries); {field.name} has shapes {sorted({tuple(p.shape) for p in parts})}")
        fields.append(torch.stack(parts))
        in_dims.append(0)
    return fields, tuple(in_dims)
