"""Exact BatchNorm for the batched engine's vmap path (networks that cannot be folded: simt.algorithms.engines),
and the running-statistics bookkeeping that path and task folding share.

Why: under vmap, `nn.BatchNorm2d` with batch statistics runs through PyTorch's batching rule for the fused
batch-norm kernel, whose second-order gradient is wrong when BN's weight and bias differ per task (adapted
in the inner loop, as ResNet-12's meta-BatchNorm): 4-5% relative error in the MAML meta-gradient, in
float64 too (torch 2.14; Conv4, whose BN affine is not adapted, happened to come out right). The same
normalisation written with plain tensor ops (mean and biased variance over N, H, W) is differentiated op
by op and is exact in every case. So while the batched engine runs, `exact_batch_norm(model)` turns every
`nn.BatchNorm2d` of the model into an `ExactBatchNorm2d` (same parameters, buffers and names) and back
afterwards; the per-task loop keeps PyTorch's fused kernel (faster, and the reference's bits unchanged).

Running statistics (ProtoNet's BN): with stacked tasks each task has its own batch statistics while the
running buffers are shared, so they cannot be updated in place during the pass (nor at all inside vmap).
The statistics are recorded instead and `RunningStatistics.apply` updates the buffers afterwards, task by
task in the order the per-task loop would have, with the update rule of `nn.BatchNorm2d`.
"""
from contextlib import contextmanager

import torch
from torch import nn


class RunningStatistics:
    """The running-statistic updates of one batched forward, kept until vmap has returned.

    `values` holds one (batch mean, unbiased batch variance) pair per BN call, in call order; returned
    out of vmap, each becomes a (tasks, C) pair. `buffers` holds the buffers each call would update.
    """

    def __init__(self):
        self.buffers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | None]] = []
        self.values: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(self, module: nn.BatchNorm2d, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        # Inside functional_call these are the buffers bound for this pass (the student's or the target's).
        self.buffers.append((module.running_mean, module.running_var, module.num_batches_tracked, module.momentum))
        self.values.append((mean.detach(), unbiased_var.detach()))

    @torch.no_grad()
    def apply(self, values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """`values`: `self.values` as vmap returned them, each (tasks, C). Updates the buffers in place, as
        the per-task loop would have: task by task, each task's calls in order.

        The loop's updates of one buffer form a chain r <- (1 - m) r + m s over its K statistics s_j, so they
        are applied in closed form, a few ops per buffer instead of a few per update:
        r_K = (1 - m)^K r_0 + sum_j m (1 - m)^(K-1-j) s_j; with momentum None (nn.BatchNorm2d's cumulative
        average over the n_0 batches seen so far) r_K = (n_0 r_0 + sum_j s_j) / (n_0 + K)."""
        chains: dict[int, tuple[tuple, list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        for buffers, stats in zip(self.buffers, values):  # the calls that update the same buffers, in order
            chains.setdefault(id(buffers[0]), (buffers, []))[1].append(stats)
        for (running_mean, running_var, batches, momentum), calls in chains.values():
            # (tasks, calls, C) -> (tasks * calls, C): the loop's order, task-major
            # In the buffers' dtype (float32 under bf16 autocast too), as nn.BatchNorm2d's kernel accumulates.
            means = torch.stack([mean for mean, _ in calls], dim=1).flatten(0, 1).to(running_mean.dtype)
            variances = torch.stack([var for _, var in calls], dim=1).flatten(0, 1).to(running_var.dtype)
            count = means.shape[0]
            if momentum is None:  # on the device, without reading the count back
                for running, stats in ((running_mean, means), (running_var, variances)):
                    running.mul_(batches).add_(stats.sum(0)).div_(batches + count)
            else:
                # Made on the device: a copy from the host would wait for the GPU (this runs before the backward).
                exponents = torch.arange(count - 1, -1, -1, dtype=torch.float64, device=means.device)
                weights = (momentum * (1 - momentum) ** exponents).to(means.dtype)[:, None]
                for running, stats in ((running_mean, means), (running_var, variances)):
                    running.mul_((1 - momentum) ** count).add_((weights * stats).sum(0))
            batches.add_(count)


class ExactBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` with batch statistics computed by plain tensor ops (exact under vmap, any order).

    Same arithmetic as `F.batch_norm` in training mode: y = (x - mean) / sqrt(var + eps) * weight + bias,
    mean and biased variance over (N, H, W) per channel. Running statistics are recorded in
    `self.running_statistics` (see RunningStatistics), never updated here.
    """

    running_statistics: RunningStatistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.running_mean is not None:
            return super().forward(x)  # running statistics: an affine map with no batch dependence, exact
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        mean = x.mean(dim=dims)
        centred = x - mean.view(shape)
        var = centred.square().mean(dim=dims)  # biased, as the normalisation of F.batch_norm
        if self.training and self.track_running_stats:
            count = x.shape[0] * x.shape[2] * x.shape[3]
            self.running_statistics.record(self, mean, var * count / (count - 1))  # running var is unbiased
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


@contextmanager
def exact_batch_norm(model: nn.Module, statistics: RunningStatistics | None = None):
    """Within the block, every `nn.BatchNorm2d` of `model` is an `ExactBatchNorm2d`; yields the
    RunningStatistics its forwards record (into `statistics` if given). Parameters, buffers and names are
    untouched."""
    statistics = RunningStatistics() if statistics is None else statistics
    swapped = [module for module in model.modules() if type(module) is nn.BatchNorm2d]
    for module in swapped:
        module.__class__ = ExactBatchNorm2d
        module.running_statistics = statistics
    try:
        yield statistics
    finally:
        for module in swapped:
            module.__class__ = nn.BatchNorm2d
            del module.running_statistics
