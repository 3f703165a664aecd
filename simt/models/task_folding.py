"""Several tasks through one network in one pass, folded into the channels (the batched engine's fast path).

T tasks' images enter as one batch (N, T*C, H, W): task t owns channels t*C..(t+1)*C-1 of every layer. A
convolution whose weights differ per task is then one grouped convolution (groups × T), BatchNorm over
T*C channels computes each task's own batch statistics, and element-wise layers, pooling and dropout need
nothing at all; the linear head multiplies each task's features by its own weights (one batched matmul).
Every op is a plain PyTorch op, so autograd differentiates it as in the per-task loop (second order
included), and one op does T tasks' work: on a GPU, where the per-task loop is bound by dispatching tiny
kernels, that is where the batched engine's speed comes from. (torch.func.vmap does the same folding op by
op, at the price of several reshapes and permutes per op: the first batched engine dispatched about as
many ops for 4 tasks as the loop.)

Weights with a leading task dimension (the ones the inner loop adapts) are used per task; weights without
it (e.g. Conv4's BatchNorm affine, ANIL's body) are shared by every task. Models whose forward only chains
Conv2d, BatchNorm2d, Linear and layout-free ops (element-wise, pooling, dropout, flatten before the head)
say so with `folds_tasks = True` (Conv4, ResNet-12); others run under vmap (simt.algorithms.engines).
"""
from contextlib import contextmanager
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from simt.models.batch_norm import RunningStatistics


class _Folded:
    """What the folded layers of one `folded_tasks` block share: the task count, and the per-task copies
    of the weights every task shares (the same θ tensors in every forward of the block: repeated once)."""

    tasks: int
    shared_copies: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]]

    def _per_task(self, weight: torch.Tensor | None, dims: int) -> torch.Tensor | None:
        """A weight as T stacked copies, (T * size, ...): its own per task if it has a task dimension."""
        if weight is None:
            return None
        if weight.dim() == dims + 1:  # (T, size, ...)
            return weight.reshape(self.tasks * weight.shape[1], *weight.shape[2:])
        # Keyed by grad mode too: a copy made without grad carries no graph back to θ.
        key = (id(weight), torch.is_grad_enabled())
        cached = self.shared_copies.get(key)
        if cached is None or cached[0] is not weight:
            cached = self.shared_copies[key] = (weight, weight.repeat(self.tasks, *([1] * (dims - 1))))
        return cached[1]


class FoldedConv2d(_Folded, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T * C_in, H, W) -> (N, T * C_out, H', W')
        return F.conv2d(x, self._per_task(self.weight, 4), self._per_task(self.bias, 1), self.stride,
                        self.padding, self.dilation, self.groups * self.tasks)


class FoldedBatchNorm2d(_Folded, nn.BatchNorm2d):
    running_statistics: RunningStatistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T * C, H, W), statistics per task and channel
        weight, bias = self._per_task(self.weight, 1), self._per_task(self.bias, 1)
        if self.running_mean is not None and not self.training:
            return F.batch_norm(x, self.running_mean.repeat(self.tasks), self.running_var.repeat(self.tasks), weight,
                                bias, False, 0.0, self.eps)
        if self.running_mean is not None:  # recorded per task, applied afterwards in the loop's order
            with torch.no_grad():  # in float32 under bf16 autocast, as nn.BatchNorm2d's kernel computes them
                full = x.to(torch.promote_types(x.dtype, torch.float32))
                dims, count = (0, 2, 3), x.shape[0] * x.shape[2] * x.shape[3]
                mean = full.mean(dim=dims).view(self.tasks, -1)
                var = full.var(dim=dims, correction=1).view(self.tasks, -1) if count > 1 else torch.zeros_like(mean)
            self.running_statistics.record(self, mean, var)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)


class FoldedLinear(_Folded, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T * F) -> (N, T * O)
        n = x.shape[0]
        per_task = x.view(n, self.tasks, -1).transpose(0, 1)  # (T, N, F)
        weight = self.weight if self.weight.dim() == 3 else self.weight.expand(self.tasks, *self.weight.shape)
        if self.bias is None:
            out = torch.bmm(per_task, weight.transpose(1, 2))
        else:
            bias = self.bias if self.bias.dim() == 2 else self.bias.expand(self.tasks, -1)
            out = torch.baddbmm(bias.unsqueeze(1), per_task, weight.transpose(1, 2))
        return out.transpose(0, 1).reshape(n, -1)


FOLDED = {nn.Conv2d: FoldedConv2d, nn.BatchNorm2d: FoldedBatchNorm2d, nn.Linear: FoldedLinear}


@contextmanager
def folded_tasks(model: nn.Module, tasks: int, statistics: RunningStatistics | None = None,
                 shared_copies: dict | None = None) -> Iterator[RunningStatistics]:
    """Within the block, the model's Conv2d, BatchNorm2d and Linear layers take `tasks` folded tasks (same
    parameters, buffers and names); yields the RunningStatistics its BatchNorm layers record into.
    `shared_copies` (the per-task copies of shared weights) may be kept across blocks that see the same weights."""
    statistics = RunningStatistics() if statistics is None else statistics
    shared_copies = {} if shared_copies is None else shared_copies
    swapped = [(module, type(module)) for module in model.modules() if type(module) in FOLDED]
    for module, plain in swapped:
        if plain is nn.Conv2d and module.padding_mode != "zeros":
            raise ValueError(f"task folding supports zero-padded convolutions only, not {module.padding_mode!r}")
        module.__class__ = FOLDED[plain]
        module.tasks, module.shared_copies = tasks, shared_copies
        if plain is nn.BatchNorm2d:
            module.running_statistics = statistics
    try:
        yield statistics
    finally:
        for module, plain in swapped:
            module.__class__ = plain
            del module.tasks, module.shared_copies
            if plain is nn.BatchNorm2d:
                del module.running_statistics


def fold(x: torch.Tensor) -> torch.Tensor:
    """(T, N, C, H, W) -> (N, T * C, H, W)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def unfold(outputs: torch.Tensor, tasks: int) -> torch.Tensor:
    """(N, T * O, ...) -> (T, N, O, ...)."""
    return outputs.view(outputs.shape[0], tasks, outputs.shape[1] // tasks, *outputs.shape[2:]).transpose(0, 1)
