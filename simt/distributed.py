"""Meta-batches split across processes: `torchrun --nproc_per_node=N run.py ...`.

Every rank samples the whole meta-batch with the same seeded sampler (sampling is cheap), so the sampler
state, and with it checkpoints and resumption, is the same on every rank; each rank then runs only its
share of the tasks (`shard`: tasks rank, rank + N, ...). The outer loss is the mean over the meta-batch,
so a rank's loss is its tasks' sum divided by the meta-batch size, and summing the ranks' gradients
(`all_reduce_gradients`) gives exactly the single-process meta-gradient (up to the order of float
additions). All ranks then take the same Adam step and the same momentum update: parameters and
momentum target stay identical without being communicated. Only rank 0 validates, logs, writes
checkpoints and tests (`is_main`).

BatchNorm running statistics (ProtoNet) are the one piece of state that depends on which tasks a rank
saw; `average_buffers` makes them the mean over ranks after every step, so every rank holds the same
ones. That mean of per-rank running averages is close to, not bitwise, the single-process sequence.

torch.distributed is initialised from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT): NCCL for CUDA tensors, gloo for CPU tensors. Without torchrun every function here is the
single-process identity.
"""
import datetime
import os

import torch
import torch.distributed as dist


class LaunchError(ValueError):
    """A way of launching torchrun that cannot work; the message is one line."""


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> None:
    """Join the process group torchrun describes (idempotent). Generous timeout: while rank 0 validates
    (minutes at the paper's 500 episodes), the others wait in the next step's all-reduce."""
    if launched() and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def shard(items: list) -> list:
    """This rank's share of a meta-batch: items rank, rank + world, ..."""
    return items[rank()::world_size()]


def broadcast_object(value):
    """Rank 0's value on every rank (e.g. the run directory)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value) -> list:
    """Every rank's value, in rank order, on every rank ([value] in a single process)."""
    if not active():
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (and returned)."""
    if active():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_gradients(params: list[torch.Tensor]) -> None:
    """Sum every parameter's .grad over ranks, as one flat buffer (one collective, not one per tensor).
    A parameter without a gradient on this rank counts as zeros, so all ranks send the same layout."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for param, chunk in zip(params, flat.split([g.numel() for g in grads])):
        param.grad = chunk.view_as(param).clone()


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """Overwrite every rank's tensors with rank 0's (start of training: one initial state everywhere)."""
    if active():
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor, src=0)


def average_buffers(buffers: list[torch.Tensor]) -> None:
    """Floating-point buffers (BN running statistics) become their mean over ranks; integer counters are
    the same on every rank already."""
    if not active():
        return
    with torch.no_grad():
        for buffer in buffers:
            if buffer.is_floating_point():
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(world_size())


def hydra_overrides(argv: list[str]) -> list[str]:
    """Extra command-line overrides that make torchrun's N processes one run: the same run directory on every
    rank (rank 0's clock; Hydra's default layout) unless one is given, and on ranks > 0 no .hydra copy, no
    log file and only warnings on the console. Sweeps (-m) are refused: their jobs are separate runs."""
    if any(arg in ("-m", "--multirun") for arg in argv):
        raise LaunchError("torchrun runs one configuration: launch sweeps (-m) without torchrun, or give each "
                         "sweep job its own torchrun")
    init_from_env()
    extra = []
    if not any(arg.startswith("hydra.run.dir=") for arg in argv):
        stamp = broadcast_object(datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
        extra.append(f"hydra.run.dir=outputs/{stamp}")
    if not is_main():
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING"]
    return extra
