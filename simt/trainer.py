"""The outer loop: sample, loss, step, momentum update, log, validate, checkpoint."""
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from simt import checkpoint, distributed
from simt.algorithms.engines import meta_batch_outputs
from simt.data.tasks import TaskSampler
from simt.evaluator import ACCURACY, Metric
from simt.losses import sum_over_tasks
from simt.momentum import MomentumTarget

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # Trainer.fit saves last.pt and exits on these


class NonFiniteError(RuntimeError):
    """The outer loss or the parameters stopped being finite; nothing non-finite was checkpointed."""


def meta_batch_loss(learner, target: MomentumTarget | None, tasks,
                    metric: Metric = ACCURACY) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over tasks of the outer loss: L_task, or SiMT's (1-λ)·L_task + λ·D when a target is given.

    Returns the loss (with the graph of every task) and plain-number statistics for logging. Training
    uses `meta_batch_backward`, which accumulates the same gradient holding less of the graph at once.
    """
    stats = _StatsMean(len(tasks))
    loss = _summed_loss(learner, target, tasks, metric, stats) / len(tasks)
    return loss, stats.means()[1]


def meta_batch_backward(learner, target: MomentumTarget | None, tasks, metric: Metric = ACCURACY,
                        scale: float = 1.0, precision: str = "fp32",
                        tasks_per_backward: int | None = None) -> tuple[float, dict[str, float]]:
    """Accumulate the gradient of scale · meta_batch_loss into the meta-parameters' `.grad`; return the loss
    (unscaled) and the statistics as plain numbers. Forward passes run under `autocast(precision)`,
    backward passes outside it.

    The per-task engines backpropagate each task's loss as soon as it exists, as the official code does:
    one task's second-order graph (the activations of all its inner steps) is freed before the next task
    runs, so the peak memory is one task's graph, not the meta-batch's; on a CPU that is faster too
    (benchmarks/README.md). The batched engine builds one graph for all tasks and backpropagates it once,
    or, with `tasks_per_backward` N (trainer.tasks_per_backward), one per N tasks: about N tasks' graph in
    memory instead of the whole meta-batch's, for more (smaller) kernel launches.
    """
    size = (tasks_per_backward or len(tasks)) if learner.engine == "batched" else 1
    groups = [tasks[start:start + size] for start in range(0, len(tasks), size)]
    losses, stats = [], _StatsMean(len(tasks))
    for group in groups:
        with autocast(group[0].query_x.device, precision):
            loss = _summed_loss(learner, target, group, metric, stats)
        (loss * (scale / len(tasks))).backward()
        losses.append(loss.detach())
    # Read from the device once, after every backward: a read mid-step would make the CPU wait for the GPU
    # to finish the forward passes before it could queue the backward ones.
    group_losses, means = stats.means(*losses)
    total = 0.0
    for value in group_losses:
        total += value / len(tasks)
    return total, means


def _summed_loss(learner, target: MomentumTarget | None, tasks, metric: Metric,
                 stats: "_StatsMean") -> torch.Tensor:
    """Sum over `tasks` of the outer loss (with its graph); their statistics' sums are added to `stats`.

    The query outputs come from the learner's engine (simt.algorithms.engines: task by task, or all tasks
    at once), as stacks of tasks; losses and statistics are computed here, once per stack, the same for every
    engine (a loss that is a mean over samples in one call for the whole stack: simt.losses)."""
    total = 0.0
    for stack in meta_batch_outputs(learner, learner.meta_parameters(), target, tasks):
        task_losses = sum_over_tasks(learner.task_loss, stack.student, stack.targets)
        loss, sums = task_losses, {"task_loss": task_losses.detach(), "distill_loss": task_losses.new_zeros(()),
                                   metric.name: metric.total(stack.student.detach(), stack.targets)}
        if target is not None:
            loss, distill = target.loss(task_losses, stack.student, stack.teacher)
            sums["distill_loss"] = distill.detach()
            sums[f"target_{metric.name}"] = metric.total(stack.teacher, stack.targets)
        stats.add(sums)
        total = total + loss
    return total


class _StatsMean:
    """Means of statistics over a meta-batch of `count` tasks, from their sums over stacks of its tasks. The
    sums stay tensors (on the device) until `means` reads them all, and any `extra` tensors, in one transfer."""

    def __init__(self, count: int):
        self.count, self.sums = count, []

    def add(self, sums: dict[str, torch.Tensor]) -> None:
        self.sums.append(sums)

    def means(self, *extra: torch.Tensor) -> tuple[list[float], dict[str, float]]:
        """(the `extra` values as numbers, the mean of each statistic), the stacks' sums added in float64."""
        tensors = [value for sums in self.sums for value in sums.values()] + list(extra)
        numbers = iter(torch.stack([t.to(torch.float64).reshape(()) for t in tensors]).tolist())  # all detached
        means: dict[str, float] = {}
        for sums in self.sums:
            for name in sums:
                means[name] = means.get(name, 0.0) + next(numbers) / self.count
        return list(numbers), means


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element is finite, read from the device once: the largest magnitude of each tensor
    (NaN if it holds one) in one multi-tensor op, not a check and a GPU-to-CPU wait per tensor."""
    tensors = [t.detach() for t in tensors if t.numel()]  # an empty tensor has no infinity norm (and no NaN)
    return not tensors or bool(torch.stack(torch._foreach_norm(tensors, float("inf"))).isfinite().all())


def autocast(device: torch.device, precision: str):
    """`trainer.precision`: fp32, or bf16 autocast (matmuls and convolutions in bfloat16, parameters, inner
    SGD updates and losses in float32). Not fp16: its double backward is a known source of NaNs."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass
class TrainState:
    step: int = 0
    best_value: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)  # one dict of validation metrics per evaluation
    saved_step: int | None = None  # step of the last last.pt written


class Trainer:
    """Runs `steps` outer steps. `score_validation(step)` returns {"student": v, "target": v} on the fixed
    validation episodes; `selects` names which one chooses the best checkpoint (the target when SiMT is on).

    Only validations at multiples of `eval_every` choose the best checkpoint; the one at the last step (if
    it is not such a multiple) is logged but does not choose, so extending a finished run later gives
    exactly the run that would have been trained at the longer length in one go. (A run shorter than
    `eval_every` has no scheduled validation: its last step chooses.)"""

    def __init__(self, learner, target: MomentumTarget | None, optimizer: torch.optim.Optimizer,
                 sampler: TaskSampler, score_validation: Callable[[int], dict[str, float]], run_dir: Path,
                 steps: int, meta_batch_size: int, eval_every: int, checkpoint_every: int,
                 device: torch.device, metric: Metric = ACCURACY, writer=None, progress: bool = False,
                 config: dict | None = None, on_validation: Callable[[int, float], None] | None = None,
                 precision: str = "fp32", tasks_per_backward: int | None = None):
        self.learner, self.target, self.optimizer, self.sampler = learner, target, optimizer, sampler
        self.tasks_per_backward = tasks_per_backward  # the batched engine's graph size (meta_batch_backward)
        self.on_validation = on_validation  # e.g. an Optuna trial's report; it may raise to stop the run
        self.score_validation, self.run_dir = score_validation, Path(run_dir)
        self.writer, self.progress = writer, progress
        self.steps, self.meta_batch_size, self.device, self.precision = steps, meta_batch_size, device, precision
        self.eval_every, self.checkpoint_every = eval_every, checkpoint_every
        self.metric, self.higher_is_better, self.config = metric, metric.higher_is_better, config or {}
        self.selects = "target" if target is not None else "student"
        self.state = TrainState()
        self._stop_signal: int | None = None
        self._rank_rngs: list[dict] | None = None

    def fit(self) -> TrainState:
        # Cluster preemption (SIGTERM) and Ctrl-C (SIGINT): finish the step, save, then exit 128 + the signal.
        previous = {signum: signal.signal(signum, self._request_stop) for signum in STOP_SIGNALS}
        main = distributed.is_main()  # torchrun: only rank 0 validates, logs and writes checkpoints
        self._start_ranks()
        bar = tqdm(total=self.steps, initial=self.state.step, desc="train", disable=not (self.progress and main))
        try:
            for step in range(self.state.step + 1, self.steps + 1):
                started = time.perf_counter()
                loss, stats, stop = self._meta_step(step)
                if self.target is not None:
                    self.target.update(self.learner.meta_parameters(), step)  # θ_m <- η_t·θ_m + (1-η_t)·θ
                self.state.step = step
                self._log(step, {"loss": loss, **stats, "step_time_s": time.perf_counter() - started})
                if main and (step % self.eval_every == 0 or step == self.steps):
                    self._validate(step, selects=step % self.eval_every == 0 or self.state.best_step is None)
                if step % self.checkpoint_every == 0 or step == self.steps or stop:
                    self.save()  # every rank takes part (its random state); rank 0 writes
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", best=self.state.best_value)
                if stop:
                    signum = self._stop_signal or signal.SIGTERM  # another rank may have been the one signalled
                    log.warning("%s: checkpoint saved at step %d, exiting", signal.Signals(signum).name, step)
                    raise SystemExit(128 + signum)
        finally:
            bar.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self.state

    def _meta_step(self, step: int) -> tuple[float, dict[str, float], bool]:
        """One outer step on this rank's share of the meta-batch; returns the meta-batch's loss and statistics
        (summed over ranks) and whether any rank was asked to stop."""
        tasks = self.sampler.sample_meta_batch(self.meta_batch_size)  # all ranks draw all: one sampler state
        own = [task.to(self.device) for task in distributed.shard(tasks)]
        share = len(own) / self.meta_batch_size  # this rank's part of the mean over the meta-batch
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = meta_batch_backward(self.learner, self.target, own, self.metric, scale=share,
                                          precision=self.precision, tasks_per_backward=self.tasks_per_backward)
        totals = distributed.all_reduce_sum(torch.tensor(
            [loss * share, *(value * share for value in stats.values()), float(bool(self._stop_signal))],
            dtype=torch.float64))
        if not math.isfinite(totals[0]):  # stop before the step: the last good checkpoint stays intact
            self._fail(f"non-finite outer loss ({totals[0].item()}) at step {step}")
        params = self.learner.meta_parameters()
        distributed.all_reduce_gradients(list(params.values()))
        self.optimizer.step()
        if not _all_finite(list(params.values())):
            self._fail(f"non-finite parameters after the optimizer step at step {step}")
        distributed.average_buffers(self._buffers())
        return totals[0].item(), dict(zip(stats, totals[1:-1].tolist())), bool(totals[-1] > 0)

    def _buffers(self) -> list[torch.Tensor]:
        """State besides θ that forward passes change: BN running statistics, the learner's and the target's."""
        buffers = list(self.learner.momentum_buffers().values())
        if self.target is not None:
            buffers += [value for key, value in self.target.params.items() if key not in self.target.keys]
        return buffers

    def _start_ranks(self) -> None:
        """torchrun: rank 0's weights everywhere (they are equal by seeding; this makes it a fact), and a
        different dropout stream per rank: derived from the common one at the start, the rank's own saved
        stream on a resume (with the same number of ranks; else derived again from the checkpoint's)."""
        if distributed.world_size() == 1:
            return
        target = list(self.target.params.values()) if self.target is not None else []  # its buffers included
        distributed.broadcast_tensors([*self.learner.meta_parameters().values(),
                                       *self.learner.momentum_buffers().values(), *target])
        if self._rank_rngs is not None and len(self._rank_rngs) == distributed.world_size():
            _set_rng_states(self._rank_rngs[distributed.rank()])
        else:
            torch.manual_seed(int(torch.randint(2**62, (1,))) + distributed.rank())

    def _fail(self, what: str):
        saved = self.state.saved_step
        raise NonFiniteError(f"{what}; stopped, " + (f"last checkpoint kept at step {saved}" if saved is not None
                                                     else "no checkpoint was written"))

    def _validate(self, step: int, selects: bool) -> None:
        metrics = self.score_validation(step)
        self.state.history.append({"step": step, **metrics, "selects": selects})
        self._log(step, {f"val_{name}": value for name, value in metrics.items()})
        value = metrics[self.selects]
        best = self.state.best_value
        if selects and (best is None or (value > best if self.higher_is_better else value < best)):
            self.state.best_value, self.state.best_step = value, step
            checkpoint.save_atomic({"step": step, "value": value, **self._weights(), "config": self.config},
                                   self.run_dir / checkpoint.BEST)
        log.info("step %d  val %s  (best %.3f at step %s)", step,
                 "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()), self.state.best_value, self.state.best_step)
        if self.on_validation is not None:
            self.on_validation(step, value)

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name.replace("_", "/", 1) if name.startswith("val_") else f"train/{name}",
                                       value, step)

    def _request_stop(self, signum, frame) -> None:
        self._stop_signal = signum
        if signum == signal.SIGINT:  # a second Ctrl-C stops at once (KeyboardInterrupt), without the checkpoint
            signal.signal(signal.SIGINT, signal.default_int_handler)

    # -- checkpoints -------------------------------------------------------------------------------
    def _weights(self) -> dict:
        return {"learner": self.learner.state_dict(),
                "target": self.target.state_dict() if self.target is not None else None}

    def save(self) -> None:
        """Write last.pt (rank 0). Under torchrun every rank calls it: each draws its own dropout masks, so
        each rank's random state is saved, and a resumed run continues every stream where it stopped."""
        rank_rngs = distributed.all_gather_object(_rng_states())
        state = self.state
        state.saved_step = state.step  # on every rank: its error messages name the last checkpoint
        if not distributed.is_main():
            return
        checkpoint.save_atomic({
            **self._weights(),
            "step": state.step, "best_value": state.best_value, "best_step": state.best_step,
            "history": state.history, "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(), "rng": rank_rngs[0], "config": self.config,
            **({"rank_rngs": rank_rngs} if len(rank_rngs) > 1 else {}),
        }, self.run_dir / checkpoint.LAST)

    def resume(self, payload: dict) -> None:
        self.learner.load_state_dict(payload["learner"])
        if self.target is not None:
            self.target.load_state_dict(payload["target"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.sampler.load_state_dict(payload["sampler"])
        _set_rng_states(payload["rng"])
        self._rank_rngs = payload.get("rank_rngs")  # restored by _start_ranks when the world size matches
        # Drop last-step validations that did not choose: a longer run would not have made them.
        history = [entry for entry in payload["history"] if entry["selects"]]
        self.state = TrainState(payload["step"], payload["best_value"], payload["best_step"], history,
                                saved_step=payload["step"])


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
