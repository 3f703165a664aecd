"""Engines: how the tasks of a meta-batch are run (the `algo.engine` key). All give the same meta-gradient.

- `loop`: one task after another, inner gradients by torch.autograd.grad. The reference.
- `higher`: the same loop with the inner SGD done by the `higher` library (an independent implementation).
- `batched`: all tasks at once, torch.func.vmap over the per-task computation, inner gradients by
  torch.func.grad (second order where the learner asks for it). On a GPU the loop is bound by kernel
  launches (tiny per-task kernels); vmap folds the tasks into one batch, so each kernel does T tasks' work.
  BatchNorm runs as `ExactBatchNorm2d` meanwhile (simt.models.batch_norm says why), and dropout draws
  a different mask for every task (vmap's randomness="different").
- `auto`: `resolve_engine` picks one from the device.

Every engine runs the same per-task code (`_task_outputs`: the learner's student and teacher outputs);
engines differ only in how they map it over the tasks and in how the learner's inner loop computes its
gradient (`INNER_STEPS`). The losses and statistics built from the outputs (simt.trainer.meta_batch_loss)
are therefore one implementation for all engines.
"""
import dataclasses

import torch

from simt.algorithms.inner_loop import InnerStep, Params, func_sgd_step, higher_sgd_step, sgd_step
from simt.data.tasks import Task
from simt.models.batch_norm import exact_batch_norm

INNER_STEPS: dict[str, InnerStep] = {"loop": sgd_step, "batched": func_sgd_step, "higher": higher_sgd_step}
ENGINES = ("auto", *INNER_STEPS)
LABELS = ("support_y", "query_y")


def resolve_engine(engine: str, device: torch.device) -> str:
    """The engine `auto` stands for on `device`; any other valid name is returned as it is.

    CPU: `loop`, the faster of the two in `make bench` on this project's 2-core machines (benchmarks/results/:
    vmap only adds work where kernels are compute-bound). CUDA: `batched`, because the loop is bound by
    kernel launches there; `make bench-gpu` measures it (no GPU numbers yet: benchmarks/README.md).
    """
    if engine not in ENGINES:
        raise ValueError(f"algo.engine={engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "batched" if torch.device(device).type == "cuda" else "loop"
    return engine


def meta_batch_outputs(learner, theta: Params, target,
                       tasks: list[Task]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per task, (student query outputs, teacher query outputs or None without a momentum target).

    `learner.engine` (a resolved name) chooses how: task by task, or all tasks at once under vmap.
    """
    if learner.engine != "batched":
        return [_task_outputs(learner, theta, target, task) for task in tasks]

    def one_task(task: Task):
        student, teacher = _task_outputs(learner, theta, target, task)
        return (student,) if teacher is None else (student, teacher)

    outputs = _vmap_over_tasks(learner, one_task, tasks, randomness="different")  # a dropout mask per task
    students = outputs[0].unbind(0)
    teachers = outputs[1].unbind(0) if target is not None else [None] * len(tasks)
    return list(zip(students, teachers))


def batched_eval_outputs(learner, params: Params, tasks: list[Task]) -> list[torch.Tensor]:
    """`learner.eval_outputs(params, task)` for every task of `tasks` (equal shapes), all at once under vmap.

    Why: test time scores thousands of episodes, each adapted on its own; one at a time, a GPU runs tiny,
    launch-bound kernels (as the per-task training loop does). The per-task code is the per-episode
    path's, so the results are the same whatever `learner.engine` is, with two differences in how it runs:
    the inner step is func_sgd_step (autograd.grad does not run under vmap), and BatchNorm is exact
    (ExactBatchNorm2d; in eval mode, ProtoNet's, it is the same fused, running-statistics kernel).
    Evaluation needs no meta-gradient, so `params` enter detached: no graph back to θ is kept per task.
    """
    params = {key: value.detach() for key, value in params.items()}
    # randomness="error": evaluation draws nothing random (dropout is off), so a random op would be a bug.
    outputs = _vmap_over_tasks(learner, lambda task: learner.eval_outputs(params, task, inner_step=func_sgd_step),
                               tasks, randomness="error")
    return list(outputs.unbind(0))


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


def _stacked(tasks: list[Task]) -> tuple[list[torch.Tensor], tuple[int | None, ...]]:
    """Task fields stacked over the tasks, (tasks, ...), and vmap's in_dims for them.

    Labels that every task shares (the sampler numbers the classes of each task 0..ways-1 in order) enter
    unbatched: label-dependent sizes, such as ProtoNet's class count, then stay plain numbers under vmap.
    """
    fields, in_dims = [], []
    for field in dataclasses.fields(Task):
        parts = [getattr(task, field.name) for task in tasks]
        if field.name in LABELS and all(torch.equal(parts[0], part) for part in parts[1:]):
            fields.append(parts[0])
            in_dims.append(None)
            continue
        if len({part.shape for part in parts}) > 1:
            raise ValueError(f"algo.engine=batched: the tasks of a meta-batch must have equal shapes (same ways, "
                             f"shots, queries); {field.name} has shapes {sorted({tuple(p.shape) for p in parts})}")
        fields.append(torch.stack(parts))
        in_dims.append(0)
    return fields, tuple(in_dims)
