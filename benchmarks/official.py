"""An official-style SiMT meta-step: the baseline the benchmark compares our engines with.

Written for the benchmark from a description of how the official SiMT code (torch 1.8 + torchmeta) is
organised, not from its source. What it keeps of that structure, because that is what costs time:

- Data: a torchvision-style Dataset whose `__getitem__` decodes one PNG image with PIL and converts it
  with `transforms.ToTensor()`; an episode is assembled image by image (our TaskSampler instead indexes
  one in-memory uint8 tensor).
- One task at a time. The inner loop adapts an OrderedDict of the nn.Module's named parameters with
  `torch.autograd.grad(create_graph=True)` and runs the network functionally on those weights, the way a
  torchmeta `MetaModule.forward(x, params=...)` does (`meta_forward` below; our learners instead go
  through `torch.func.functional_call` on a params dict).
- Each task's outer loss is backpropagated as soon as it is computed (`loss.backward()` per task,
  gradients accumulating in `.grad`), then one optimizer step for the meta-batch.
- The momentum network is a second nn.Module (a deep copy) updated in place after the optimizer step.

What it computes is the same as our `loop` engine (tests/test_bench.py checks the meta-gradient in
float64), so the timing comparison is between two implementations of one computation.
"""
import copy
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
    """T² · KL(teacher || student) on temperature-softened distributions, averaged over query rows."""
    teacher_probs = F.softmax(teacher / temp, dim=1)
    return F.kl_div(F.log_softmax(student / temp, dim=1), teacher_probs, reduction="batchmean") * temp ** 2


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


class _OfficialLearner:
    """Outer loop shared by both: per-task backward, one Adam step, then the momentum network's EMA."""

    def __init__(self, model: nn.Module, lr: float, momentum: dict | None, averaged: list[str]):
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.momentum = momentum  # {"eta", "lam", "temp"} or None (no SiMT)
        self.momentum_model = copy.deepcopy(model) if momentum is not None else None
        self.averaged = averaged

    def meta_step(self, tasks: list[Task]) -> None:
        self.optimizer.zero_grad()
        self.accumulate(tasks)
        self.optimizer.step()
        if self.momentum_model is not None:
            self.update_momentum()

    def accumulate(self, tasks: list[Task]) -> list[float]:
        """Backpropagate each task's outer loss / len(tasks) at once; returns per-task accuracies (logged)."""
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


def _prototype_logits(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Negative squared distances of each query embedding to each class mean of the support embeddings."""
    ways = int(support_y.max()) + 1
    prototypes = torch.stack([support[support_y == k].mean(0) for k in range(ways)])
    return -((query[:, None] - prototypes[None]) ** 2).sum(-1)


class OfficialProtoNet(_OfficialLearner):
    """ProtoNet (+ SiMT) in the official structure: plain `model(x)` calls, BN running statistics, no inner loop."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, momentum: dict | None = None):
        super().__init__(model, lr, momentum, averaged=[name for name, _ in model.named_parameters()])

    def student_logits(self, task: Task) -> torch.Tensor:
        self.model.train()
        set_dropout(self.model, True)
        return _prototype_logits(self.model(task.support_x), task.support_y, self.model(task.query_x))

    @torch.no_grad()
    def teacher_logits(self, task: Task) -> torch.Tensor:
        model = self.momentum_model.train()
        set_dropout(model, True)  # dropout on for the target's support pass, off for its query pass
        support = model(task.support_x)
        set_dropout(model, False)
        return _prototype_logits(support, task.support_y, model(task.query_x))

    @torch.no_grad()
    def eval_logits(self, task: Task) -> torch.Tensor:
        self.model.eval()
        try:
            return _prototype_logits(self.model(task.support_x), task.support_y, self.model(task.query_x))
        finally:
            self.model.train()
