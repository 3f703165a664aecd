"""Engines: how the tasks of a meta-batch are run (the `algo.engine` key). All give the same meta-gradient.

- `loop`: one task after another, inner gradients by torch.autograd.grad. The reference.
- `higher`: the same loop with the inner SGD done by the `higher` library (an independent implementation).
- `batched`: all tasks at once. On a GPU the loop is bound by dispatching ops (tiny per-task kernels, one
  Python dispatch each); here each op does T tasks' work. The learner runs its per-task code once, on the
  tasks stacked into one (`TaskBatch`, in the learner's `tasks_at_once` block): the weights the inner loop
  adapts get a leading task dimension, the inner gradients are torch.autograd.grad of the summed task
  losses (the tasks share nothing, so each task gets its own gradient), and every network pass runs all
  tasks at once: folded into the channels (simt.models.task_folding: Conv4, ResNet-12), as one ordinary
  batch where every image is processed on its own (ProtoNet's evaluation), or under torch.func.vmap over
  the task dimension (any other network: the conv regressor), with `ExactBatchNorm2d` (simt.models.batch_norm
  says why) and a dropout mask per task. Counted on a CPU, a Conv4 MAML + SiMT step of 4 tasks dispatches
  4,560 ops against the loop's 14,124; the first version (vmap over each whole task, torch.func.grad
  inside) dispatched about as many as the loop.
- `auto`: `resolve_engine` picks one from the device.

Every engine runs the same per-task code (`_task_outputs`: the learner's student and teacher outputs).
The losses and statistics built from the outputs (simt.trainer.meta_batch_loss) are one implementation for
all engines too: it reads the outputs of tasks run together as one stack (`QueryOutputs`), one task per
stack in the loop, the whole meta-batch in one with `batched`, and sums over the stack (simt.losses.sum_over_tasks).
"""
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from simt.algorithms.inner_loop import InnerStep, Params, higher_sgd_step, sgd_step
from simt.data.tasks import Task
from simt.models.batch_norm import RunningStatistics, exact_batch_norm
from simt.models.task_folding import fold, folded_tasks, unfold

INNER_STEPS: dict[str, InnerStep] = {"loop": sgd_step, "batched": sgd_step, "higher": higher_sgd_step}
ENGINES = ("auto", *INNER_STEPS)


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


class QueryOutputs(NamedTuple):
    """The query set of tasks run together: every tensor has a leading task dimension."""

    targets: torch.Tensor
    student: torch.Tensor
    teacher: torch.Tensor | None  # None without a momentum target


def meta_batch_outputs(learner, theta: Params, target, tasks: list[Task]) -> list[QueryOutputs]:
    """The student's (and the momentum target's) query outputs on `tasks`, one stack per run of the engine.

    `learner.engine` (a resolved name) chooses how: task by task (a stack of one per task), or all tasks at
    once (one stack of them all): the losses and statistics are then computed once per stack, not per task.
    """
    if learner.engine != "batched":
        return [_stack_of_one(task.query_y, *_task_outputs(learner, theta, target, task)) for task in tasks]
    with _tasks_at_once(learner, tasks) as stacked:
        return [QueryOutputs(stacked.query_y, *_task_outputs(learner, theta, target, stacked))]


def batched_eval_outputs(learner, params: Params, tasks: list[Task]) -> list[torch.Tensor]:
    """`learner.eval_outputs(params, task)` for every task of `tasks` (equal shapes), all at once.

    Why: test time scores thousands of episodes, each adapted on its own; one at a time, a GPU runs tiny,
    launch-bound kernels (as the per-task training loop does). The per-task code is the per-episode
    path's, run as the batched engine runs it, so the results are the same whatever `learner.engine` is
    (the inner step is autograd's, as the loop's, even for `higher`). Evaluation needs no meta-gradient, so
    `params` enter detached: no graph back to θ is kept per task.
    """
    params = {key: value.detach() for key, value in params.items()}
    with _tasks_at_once(learner, tasks) as stacked:
        return list(learner.eval_outputs(params, stacked, inner_step=sgd_step).unbind(0))


class StackedTasks:
    """What a learner needs to run stacked tasks (mixed into every learner): inside `tasks_at_once`, its
    network pass `_network` runs all of them through the block's TaskBatch; the per-task code is unchanged."""

    _tasks: "TaskBatch | None" = None
    model: nn.Module

    @contextmanager
    def tasks_at_once(self, tasks: "TaskBatch") -> Iterator[None]:
        self._tasks = tasks
        try:
            yield
        finally:
            self._tasks = None

    def _network(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        if self._tasks is not None:
            return self._tasks.forward(params, x)
        # Keys missing from `params` (e.g. BN affine for the momentum target) fall back to the module's own.
        return functional_call(self.model, params, (x,), strict=False)


class TaskBatch:
    """How a learner runs `count` stacked tasks at once (its `tasks_at_once` block).

    Every tensor of the stacked task has a leading task dimension, and so have the weights the inner loop
    adapts (`expand`: a view, so the meta-gradient of every task's copy flows back to the one θ); the
    weights it does not adapt stay single and are shared. `forward` runs the model on all tasks in one pass:
    as one ordinary batch when every task uses the same weights and every image is processed on its own
    (evaluation with running BatchNorm statistics: ProtoNet's); else folded into its channels
    (simt.models.task_folding) where the model allows it; else under vmap over the task dimension. The inner
    loop's loss is the sum of the task losses (`sum_over_tasks`), whose gradient with respect to the stacked
    weights is each task's own gradient (the tasks share nothing): torch.autograd.grad runs on the sum.
    BatchNorm running statistics are recorded per task and applied by `apply_statistics`, afterwards, task by
    task in the loop's order.
    """

    def __init__(self, count: int, model: nn.Module):
        self.count, self.model = count, model
        self.statistics, self.shared_copies, self._folded_inputs = RunningStatistics(), {}, {}
        self._dims = {name: t.dim() for name, t in (*model.named_parameters(), *model.named_buffers())}
        self._norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def stacked(self, params: Params, keys: list[str]) -> Params:
        """`params` with one copy of each key of `keys` per task (leading dimension `count`)."""
        return {**params, **{key: params[key].expand(self.count, *params[key].shape) for key in keys
                             if params[key].dim() == self._dims[key]}}

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """(T, N, ...) inputs -> (T, N, outputs...)."""
        in_dims = {key: 0 if value.dim() > self._dims[key] else None for key, value in params.items()}
        per_task_weights = any(dim is not None for dim in in_dims.values())
        if not per_task_weights and all(not m.training and m.running_mean is not None for m in self._norms):
            out = functional_call(self.model, params, (x.flatten(0, 1),), strict=False)
            return out.view(self.count, x.shape[1], *out.shape[1:])
        if getattr(self.model, "folds_tasks", False):
            with folded_tasks(self.model, self.count, self.statistics, self.shared_copies):
                return unfold(functional_call(self.model, params, (self._folded(x),), strict=False), self.count)
        start = len(self.statistics.values)  # BN running statistics recorded by this pass, returned out of vmap

        def one_task(task_params: Params, task_x: torch.Tensor):
            return functional_call(self.model, task_params, (task_x,), strict=False), self.statistics.values[start:]

        with exact_batch_norm(self.model, self.statistics):
            outputs, values = torch.func.vmap(one_task, in_dims=(in_dims, 0), randomness="different")(params, x)
        self.statistics.values[start:] = values
        return outputs

    def _folded(self, x: torch.Tensor) -> torch.Tensor:
        """fold(x), made once per input tensor: every inner step passes the same support images (a copy each)."""
        if x.requires_grad:
            return fold(x)
        cached = self._folded_inputs.get(id(x))
        if cached is None:  # the cache holds x itself, so no other tensor can take its id meanwhile
            cached = self._folded_inputs[id(x)] = (x, fold(x))
        return cached[1]

    def apply_statistics(self) -> None:
        self.statistics.apply(self.statistics.values)


@contextmanager
def _tasks_at_once(learner, tasks: list[Task]) -> Iterator[Task]:
    """The tasks stacked into one Task (leading task dimension), while the learner runs them at once."""
    stacked = _stacked(tasks)
    batch = TaskBatch(len(tasks), learner.model)
    with learner.tasks_at_once(batch):
        yield stacked
    batch.apply_statistics()


def _task_outputs(learner, theta: Params, target, task: Task) -> tuple[torch.Tensor, torch.Tensor | None]:
    student = learner.student_outputs(theta, task)
    return student, learner.teacher_outputs(target.params, task) if target is not None else None


def _stack_of_one(targets: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor | None) -> QueryOutputs:
    return QueryOutputs(targets.unsqueeze(0), student.unsqueeze(0), None if teacher is None else teacher.unsqueeze(0))


def _stacked(tasks: list[Task]) -> Task:
    """The tasks as one, every tensor field stacked over the tasks, (tasks, ...)."""
    fields = {}
    for field in dataclasses.fields(Task):
        parts = [getattr(task, field.name) for task in tasks]
        if not isinstance(parts[0], torch.Tensor):  # ways: kept where every task says the same
            fields[field.name] = parts[0] if len(set(parts)) == 1 else None
            continue
        if len({part.shape for part in parts}) > 1:
            raise ValueError(f"algo.engine=batched: the tasks of a meta-batch must have equal shapes (same ways, "
                             f"shots, queries); {field.name} has shapes {sorted({tuple(p.shape) for p in parts})}")
        fields[field.name] = torch.stack(parts)
    return Task(**fields)
