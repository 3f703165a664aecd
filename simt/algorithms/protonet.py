"""Prototypical Networks (Snell et al., 2017): logits are negative squared Euclidean distances from each
query embedding to the class means (prototypes) of the support embeddings."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from simt.algorithms.engines import StackedTasks, resolve_engine
from simt.algorithms.inner_loop import InnerStep, Params
from simt.data.tasks import Task
from simt.models import set_dropout

META_BATCHES = ("per_task", "shared")


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """(..., N, D) embeddings, (..., N) labels in 0..ways-1 -> (..., ways, D) class means (leading
    dimensions: stacked tasks, each with its own classes)."""
    lead, dim = embeddings.shape[:-2], embeddings.shape[-1]
    tasks = lead.numel()
    # Task t's class k is row t * ways + k: one index_add for every task, the per-task sums unchanged.
    rows = (labels.reshape(tasks, -1) + ways * torch.arange(tasks, device=labels.device)[:, None]).flatten()
    sums = embeddings.new_zeros(tasks * ways, dim).index_add_(0, rows, embeddings.reshape(-1, dim))
    # Counted by index_add too: torch.bincount reads its input's maximum back from a GPU.
    counts = embeddings.new_zeros(tasks * ways).index_add_(0, rows, embeddings.new_ones(rows.shape))
    return (sums / counts[:, None]).view(*lead, ways, dim)


def prototype_logits(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                     ways: int | None = None) -> torch.Tensor:
    """-||q - c_k||^2 for every query q and prototype c_k: (..., queries, ways), in float32 at least.
    `ways` None: read from the labels (a transfer from a GPU that waits for the embeddings).

    Under bf16 autocast the embeddings arrive in bf16, whose 8-bit mantissa would round class means and
    distances of a few hundred to whole units: logits off by that much move the softmax."""
    dtype = torch.promote_types(torch.promote_types(support.dtype, query.dtype), torch.float32)
    support, query = support.to(dtype), query.to(dtype)
    protos = prototypes(support, support_y, ways or int(support_y.max()) + 1)
    return -(query[..., :, None, :] - protos[..., None, :, :]).pow(2).sum(-1)


class ProtoNet(StackedTasks):
    """Metric-based learner; θ is the embedding network (standard BatchNorm with running statistics).

    Args:
        model: an embedding backbone (no head).
        train_ways: ways of training episodes (official: 20-way training, 5-way testing).
        engine: how a meta-batch is run (simt.algorithms.engines); `batched` embeds all its tasks' images in
            one pass (per-task BN statistics kept); no inner loop, so `higher` is the same as `loop`.
        meta_batch: "per_task": every task is embedded with BatchNorm statistics of its own (the paper's
            episodes are independent); "shared": the official code's one pass over the whole meta-batch,
            its BatchNorm statistics shared by the tasks and the running statistics updated once per pass
            (the engine is then `batched`: the tasks always run as one stack).
    """

    embedding_model = True

    def __init__(self, model: nn.Module, train_ways: int | None = 20, engine: str = "auto",
                 meta_batch: str = "per_task"):
        if meta_batch not in META_BATCHES:
            raise ValueError(f"algo.meta_batch={meta_batch!r}: expected one of {', '.join(META_BATCHES)}")
        self.model, self.train_ways = model.train(), train_ways
        self.shares_batch_statistics = meta_batch == "shared"
        if self.shares_batch_statistics and engine in ("loop", "higher"):
            raise ValueError(f"algo.engine={engine!r}: ProtoNet with meta_batch=shared runs its meta-batch in one "
                             f"pass; expected auto or batched")
        self.engine = "batched" if self.shares_batch_statistics else resolve_engine(engine, next(model.parameters()).device)

    def meta_parameters(self) -> Params:
        return dict(self.model.named_parameters())

    @property
    def momentum_keys(self) -> list[str]:
        return list(self.meta_parameters())  # the official code averages every parameter

    def momentum_buffers(self) -> Params:
        """The target keeps its own BN running statistics, updated by its own forward passes."""
        return dict(self.model.named_buffers())

    task_loss = staticmethod(F.cross_entropy)  # itself: simt.losses.sum_over_tasks knows it is a mean over samples

    def student_outputs(self, params: Params, task: Task) -> torch.Tensor:
        self.model.train()
        set_dropout(self.model, True)  # the student is perturbed in both passes
        return self._logits(params, task)

    @torch.no_grad()
    def teacher_outputs(self, params: Params, task: Task) -> torch.Tensor:
        # Official behaviour: dropout on for the target's support pass, off for its query pass.
        self.model.train()
        set_dropout(self.model, True)
        support = self._embed(params, task.support_x)
        set_dropout(self.model, False)
        return prototype_logits(support, task.support_y, self._embed(params, task.query_x), task.ways)

    @torch.no_grad()
    def eval_outputs(self, params: Params, task: Task, inner_step: InnerStep | None = None) -> torch.Tensor:
        """`inner_step`: accepted for the learners' common interface; ProtoNet has no inner loop."""
        self.model.eval()  # running BN statistics, no dropout
        try:
            return self._logits(params, task)
        finally:
            self.model.train()

    def _logits(self, params: Params, task: Task) -> torch.Tensor:
        return prototype_logits(self._embed(params, task.support_x), task.support_y,
                                self._embed(params, task.query_x), task.ways)

    def _embed(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        if self._tasks is not None and self.shares_batch_statistics:  # (T, N, ...): one plain pass over them all
            embeddings = functional_call(self.model, params, (x.flatten(0, 1),), strict=False)
            return embeddings.view(*x.shape[:2], *embeddings.shape[1:])
        return self._network(params, x)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
