"""An official-style SiMT meta-step: the baseline the benchmark compares our engines with.

Written for the benchmark from a description of how the official SiMT code (torch 1.8 + torchmeta) is
organised (/work/shared/DESIGN.md sections 4 and 7, the README's "Fidelity to the official code"), not from
its source. What it keeps of that structure, because that is what costs time:

- Data: the step takes a meta-batch already decoded and stacked, (tasks, N, C, H, W) tensors as torchmeta's
  DataLoader hands them (`MetaBatch`), and copies it to the device. Decoding is not part of the step: the
  benchmark decodes a small pool of meta-batches beforehand with `PngEpisodes` (a torchvision-style Dataset
  whose `__getitem__` decodes one PNG image with PIL and converts it with `transforms.ToTensor()`), and times
  that decoding on its own (its task-sampling table).
- MAML: one task at a time. The inner loop adapts an OrderedDict of the nn.Module's named parameters with
  `torch.autograd.grad(create_graph=True)` and runs the network functionally on those weights, the way a
  torchmeta `MetaModule.forward(x, params=...)` does (`meta_forward` below; our learners instead go
  through `torch.func.functional_call` on a params dict). Each task's outer loss is backpropagated as soon
  as it is computed (`loss.backward()` per task, gradients accumulating in `.grad`), then one optimizer step
  for the meta-batch.
- ProtoNet: the whole meta-batch in one pass. All tasks' support images go through the network as one
  (tasks * support, C, H, W) batch and all query images as another, so BatchNorm (train mode) shares its
  batch statistics across the tasks and updates its running statistics once per pass; the momentum network
  does the same under no_grad (dropout on for the supports, off for the queries). Prototypes per task
  (a scatter-add over the stacked embeddings, as torchmeta's `get_prototypes`), logits = negative squared
  distances, loss = (1-λ)·CE (mean over every query of the meta-batch) + λ·T²·KL(teacher‖student) with the
  KL summed over a task's queries and averaged over the tasks; one backward for the meta-batch, one Adam
  step.
- The momentum network is a second nn.Module (a deep copy) updated in place after the optimizer step.

What it computes (tests/test_bench.py checks the meta-gradient in float64): for MAML, what our `loop` engine
computes; for ProtoNet, what our ProtoNet computes under `compat=official` (algo.meta_batch=shared, the KL
summed over queries), which is not what our default ProtoNet (`compat=paper`: per-task BatchNorm statistics,
a per-query mean KL) computes. The benchmark's ProtoNet ratios therefore compare the released code's
structure with our default engine on the same episodes: the same convolutions, a different batching.
"""
import copy
import dataclasses
import io
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms

from simt.data.tasks import Task
from simt.models import set_dropout
from simt.models.conv4 import Conv4
from simt.models.resnet12 import ResidualBlock, ResNet12

Weights = dict[str, torch.Tensor]  # an OrderedDict of named parameters, some replaced by adapted tensors


# -- data: one PNG decode per image ----------------------------------------------------------------

def encode_png(image: torch.Tensor) -> bytes:
    """uint8 (C, H, W) -> PNG bytes (grey for one channel, RGB for three), as image files on disk hold."""
    array = image.cpu().numpy()
    array = array[0] if array.shape[0] == 1 else np.ascontiguousarray(array.transpose(1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class PngImages(Dataset):
    """Encoded images of one split; item i is decoded on every access (PIL, then ToTensor: float in [0, 1]).

    Built from a split in our layout (uint8 images (N, C, H, W), class k at rows offsets[k]:offsets[k + 1])
    so that both pipelines serve exactly the same pixels.
    """

    def __init__(self, images: torch.Tensor, offsets: torch.Tensor):
        self.png = [encode_png(image) for image in images]
        self.offsets = offsets.long()
        self.mode = "L" if images.shape[1] == 1 else "RGB"
        self.transform = transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.png)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(io.BytesIO(self.png[index])) as image:
            return self.transform(image.convert(self.mode))


class PngEpisodes:
    """N-way K-shot episodes whose images are decoded one by one from `PngImages` (labels 0..ways-1)."""

    def __init__(self, dataset: PngImages, ways: int, shots: int, queries: int, seed: int):
        self.dataset, self.ways, self.shots, self.queries = dataset, ways, shots, queries
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> Task:
        offsets, generator = self.dataset.offsets, self.generator
        classes = torch.randperm(len(offsets) - 1, generator=generator)[: self.ways].tolist()
        support, query = [], []
        for k in classes:
            size = int(offsets[k + 1] - offsets[k])
            rows = (torch.randperm(size, generator=generator)[: self.shots + self.queries] + offsets[k]).tolist()
            support += [self.dataset[i] for i in rows[: self.shots]]
            query += [self.dataset[i] for i in rows[self.shots:]]
        labels = torch.arange(self.ways)
        return Task(torch.stack(support), labels.repeat_interleave(self.shots),
                    torch.stack(query), labels.repeat_interleave(self.queries))


@dataclasses.dataclass
class MetaBatch:
    """A meta-batch as torchmeta's DataLoader hands it: every task's tensors stacked on a leading task axis."""

    support_x: torch.Tensor  # (tasks, ways * shots, C, H, W)
    support_y: torch.Tensor  # (tasks, ways * shots)
    query_x: torch.Tensor  # (tasks, ways * queries, C, H, W)
    query_y: torch.Tensor  # (tasks, ways * queries)

    @classmethod
    def stack(cls, tasks: list[Task]) -> "MetaBatch":
        return cls(*(torch.stack([getattr(task, name) for task in tasks])
                     for name in ("support_x", "support_y", "query_x", "query_y")))

    def to(self, device: torch.device) -> "MetaBatch":
        return MetaBatch(*(t.to(device) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def tasks(self) -> list[Task]:
        """Task t's tensors (views), for a learner that runs one task at a time."""
        return [Task(self.support_x[t], self.support_y[t], self.query_x[t], self.query_y[t]) for t in range(len(self))]


# -- the network run on explicit weights (torchmeta's MetaModule.forward(x, params)) ---------------

def meta_forward(model: nn.Module, x: torch.Tensor, params: Weights) -> torch.Tensor:
    """`model(x)` with every parameter taken from `params` (name -> tensor); buffers and modes from `model`."""
    return _run(model, "", x, params)


def _run(module: nn.Module, prefix: str, x: torch.Tensor, params: Weights) -> torch.Tensor:
    weight = lambda name: params.get(prefix + name)  # noqa: E731  (None where the layer has no such tensor)
    if isinstance(module, Conv4):
        features = _run(module.features, prefix + "features.", x, params).flatten(1)
        return features if module.classifier is None else _run(module.classifier, prefix + "classifier.",
                                                                 features, params)
    if isinstance(module, ResNet12):
        for i in range(1, 5):
            x = _run(getattr(module, f"layer{i}"), f"{prefix}layer{i}.", x, params)
        features = module.avgpool(x).flatten(1)
        if module.classifier is None:
            return features
        if module.dropout is not None:
            features = module.dropout(features)
        return _run(module.classifier, prefix + "classifier.", features, params)
    if isinstance(module, ResidualBlock):
        return _residual_block(module, prefix, x, params)
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            x = _run(child, f"{prefix}{name}.", x, params)
        return x
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight("weight"), weight("bias"), module.stride, module.padding, module.dilation,
                        module.groups)
    if isinstance(module, nn.BatchNorm2d):
        batch_stats = module.training or module.running_mean is None
        return F.batch_norm(x, module.running_mean, module.running_var, weight("weight"), weight("bias"),
                            training=batch_stats, momentum=module.momentum or 0.0, eps=module.eps)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight("weight"), weight("bias"))
    if any(True for _ in module.parameters(recurse=False)):
        raise TypeError(f"meta_forward: no functional form for {type(module).__name__}")
    return module(x)  # parameter-free: ReLU, LeakyReLU, Dropout, MaxPool2d


def _residual_block(block: ResidualBlock, prefix: str, x: torch.Tensor, params: Weights) -> torch.Tensor:
    run = lambda name, value: _run(getattr(block, name), f"{prefix}{name}.", value, params)  # noqa: E731
    out = block.relu(run("bn1", run("conv1", x)))
    out = block.relu(run("bn2", run("conv2", out)))
    out = run("bn3", run("conv3", out))
    out = block.relu(out + run("downsample", x))
    if block.dropout is not None and block.dropout_before_pool:
        out = block.dropout(out)
    out = block.maxpool(out)
    if block.dropout is not None and not block.dropout_before_pool:
        out = block.dropout(out)
    return out


# -- pieces shared by both learners ----------------------------------------------------------------

def _plain_norm_names(model: nn.Module) -> set[str]:
    """Affine parameters of plain BatchNorm (Conv4): meta-learned, never adapted nor averaged (official)."""
    if getattr(model, "adapts_norm", False):
        return set()
    return {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
            for p, _ in m.named_parameters(recurse=False)}


def _distillation(student: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
    """T² · KL(teacher || student) on temperature-softened distributions, averaged over query rows (MAML)."""
    teacher_probs = F.softmax(teacher / temp, dim=1)
    return F.kl_div(F.log_softmax(student / temp, dim=1), teacher_probs, reduction="batchmean") * temp ** 2


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


class _OfficialLearner:
    """Outer loop shared by both: the meta-batch's backward (MAML: per task), one Adam step, then the momentum
    network's EMA."""

    def __init__(self, model: nn.Module, lr: float, momentum: dict | None, averaged: list[str]):
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.momentum = momentum  # {"eta", "lam", "temp"} or None (no SiMT)
        self.momentum_model = copy.deepcopy(model) if momentum is not None else None
        self.averaged = averaged

    def meta_step(self, batch: "MetaBatch | list[Task]") -> None:
        self.optimizer.zero_grad()
        self.accumulate(batch)
        self.optimizer.step()
        if self.momentum_model is not None:
            self.update_momentum()

    def accumulate(self, tasks: "MetaBatch | list[Task]") -> list[float]:
        """Backpropagate each task's outer loss / len(tasks) at once; returns per-task accuracies (logged)."""
        if isinstance(tasks, MetaBatch):  # the loader's stacked tensors, run task by task
            tasks = tasks.tasks()
        accuracies = []
        for task in tasks:
            student = self.student_logits(task)
            loss = F.cross_entropy(student, task.query_y)
            if self.momentum_model is not None:
                lam = self.momentum["lam"]
                teacher = self.teacher_logits(task)
                loss = (1 - lam) * loss + lam * _distillation(student, teacher, self.momentum["temp"])
            (loss / len(tasks)).backward()
            accuracies.append(_accuracy(student.detach(), task.query_y))
        return accuracies

    @torch.no_grad()
    def update_momentum(self) -> None:
        eta = self.momentum["eta"]
        current = dict(self.model.named_parameters())
        for name, averaged in self.momentum_model.named_parameters():
            if name in self.averaged:
                averaged.mul_(eta).add_(current[name], alpha=1 - eta)


class OfficialMAML(_OfficialLearner):
    """Second-order MAML (+ SiMT when `momentum` is given) in the official code's structure.

    Inner SGD on every conv/linear parameter (and ResNet-12's meta-BatchNorm), `steps` steps of size
    `inner_lr`; the momentum network adapts first order and gives soft targets without gradient.
    """

    def __init__(self, model: nn.Module, inner_lr: float, steps: int, eval_steps: int, lr: float = 1e-3,
                 momentum: dict | None = None):
        norm = _plain_norm_names(model)
        self.adapted = [name for name, _ in model.named_parameters() if name not in norm]
        super().__init__(model, lr, momentum, averaged=self.adapted)
        self.inner_lr, self.steps, self.eval_steps = inner_lr, steps, eval_steps

    def adapt(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, second_order: bool) -> Weights:
        set_dropout(model, False)  # the inner loop runs without dropout
        params = OrderedDict(model.named_parameters())
        for _ in range(steps):
            loss = F.cross_entropy(meta_forward(model, x, params), y)
            grads = torch.autograd.grad(loss, [params[name] for name in self.adapted], create_graph=second_order)
            params = OrderedDict(params)
            for name, grad in zip(self.adapted, grads):
                params[name] = params[name] - self.inner_lr * grad
        return params

    def student_logits(self, task: Task) -> torch.Tensor:
        params = self.adapt(self.model, task.support_x, task.support_y, self.steps, second_order=True)
        set_dropout(self.model, True)  # SiMT's student perturbation: the query pass only
        try:
            return meta_forward(self.model, task.query_x, params)
        finally:
            set_dropout(self.model, False)

    def teacher_logits(self, task: Task) -> torch.Tensor:
        params = self.adapt(self.momentum_model, task.support_x, task.support_y, self.steps, second_order=False)
        with torch.no_grad():
            return meta_forward(self.momentum_model, task.query_x, params)

    def eval_logits(self, task: Task) -> torch.Tensor:
        params = self.adapt(self.model, task.support_x, task.support_y, self.eval_steps, second_order=False)
        with torch.no_grad():
            return meta_forward(self.model, task.query_x, params)


def _prototypes(support: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
    """(tasks, S, D) embeddings, (tasks, S) labels -> (tasks, ways, D) class means, by one scatter-add over the
    stacked tasks (torchmeta's `get_prototypes`)."""
    tasks, _, dim = support.shape
    counts = support.new_zeros(tasks, ways).scatter_add_(1, support_y, support.new_ones(support_y.shape))
    sums = support.new_zeros(tasks, ways, dim).scatter_add_(1, support_y[..., None].expand_as(support), support)
    return sums / counts.clamp(min=1)[..., None]


def _prototype_logits(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                      ways: int) -> torch.Tensor:
    """(tasks, Q, ways): negative squared distances of each query embedding to its task's prototypes."""
    prototypes = _prototypes(support, support_y, ways)
    return -((query[:, :, None] - prototypes[:, None]) ** 2).sum(-1)


def _embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(tasks, N, C, H, W) -> (tasks, N, D): one pass of `model` over all the tasks' images at once."""
    return model(x.flatten(0, 1)).view(*x.shape[:2], -1)


class OfficialProtoNet(_OfficialLearner):
    """ProtoNet (+ SiMT) in the official structure: the meta-batch embedded in one plain `model(x)` pass for
    the supports and one for the queries (BN in train mode, running statistics), no inner loop, one backward.

    `ways`: classes per task (the official code's configured number); None reads it from the labels.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, momentum: dict | None = None, ways: int | None = None):
        super().__init__(model, lr, momentum, averaged=[name for name, _ in model.named_parameters()])
        self.ways = ways

    def _ways(self, batch: MetaBatch) -> int:
        return self.ways or int(batch.support_y.max()) + 1

    def accumulate(self, batch: "MetaBatch | list[Task]") -> list[float]:
        """Backpropagate the meta-batch's loss (one backward); returns per-task accuracies (logged)."""
        if not isinstance(batch, MetaBatch):
            batch = MetaBatch.stack(batch)
        student = self.student_logits(batch)
        flat_student, flat_y = student.flatten(0, 1), batch.query_y.flatten()
        loss = F.cross_entropy(flat_student, flat_y)  # the mean over every query of the meta-batch
        if self.momentum_model is not None:
            lam, temp = self.momentum["lam"], self.momentum["temp"]
            teacher = self.teacher_logits(batch)
            # T² · KL(teacher || student), summed over a task's queries, averaged over the tasks.
            kl = F.kl_div(F.log_softmax(flat_student / temp, dim=1), F.softmax(teacher.flatten(0, 1) / temp, dim=1),
                          reduction="sum") / len(batch)
            loss = (1 - lam) * loss + lam * kl * temp ** 2
        loss.backward()
        return (student.detach().argmax(-1) == batch.query_y).float().mean(1).tolist()

    def student_logits(self, batch: MetaBatch) -> torch.Tensor:
        self.model.train()
        set_dropout(self.model, True)
        return _prototype_logits(_embed(self.model, batch.support_x), batch.support_y,
                                 _embed(self.model, batch.query_x), self._ways(batch))

    @torch.no_grad()
    def teacher_logits(self, batch: MetaBatch) -> torch.Tensor:
        model = self.momentum_model.train()
        set_dropout(model, True)  # dropout on for the target's support pass, off for its query pass
        support = _embed(model, batch.support_x)
        set_dropout(model, False)
        return _prototype_logits(support, batch.support_y, _embed(model, batch.query_x), self._ways(batch))

    @torch.no_grad()
    def eval_logits(self, task: Task) -> torch.Tensor:
        """One test task (eval mode: running BN statistics, no dropout): (queries, ways) logits."""
        batch = MetaBatch(task.support_x[None], task.support_y[None], task.query_x[None], task.query_y[None])
        self.model.eval()
        try:
            return _prototype_logits(_embed(self.model, batch.support_x), batch.support_y,
                                     _embed(self.model, batch.query_x), self._ways(batch))[0]
        finally:
            self.model.train()
