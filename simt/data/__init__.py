"""Data sets: each builds a FewShotDataset of class-disjoint splits, images held as uint8 in memory."""
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from simt.data.tasks import ObjectTaskSampler, TaskSampler, class_layout, fixed_episodes
from simt.evaluator import ACCURACY, Metric


@dataclass
class ClassSplit:
    """The images of one split, class k at rows offsets[k]:offsets[k + 1]."""

    images: torch.Tensor  # uint8 (N, C, H, W), possibly a view of a memory-mapped array
    offsets: torch.Tensor  # int64 (classes + 1,)

    @classmethod
    def from_tensor(cls, images: torch.Tensor, offsets: torch.Tensor | None = None) -> "ClassSplit":
        """From an equal-size (classes, instances, C, H, W) tensor, or flat images plus offsets."""
        return cls(*class_layout(images, offsets))

    @property
    def classes(self) -> int:
        return len(self.offsets) - 1

    @property
    def smallest_class(self) -> int:
        return int((self.offsets[1:] - self.offsets[:-1]).min())

    def sampler(self, ways: int, shots: int, queries: int, seed: int, min_shots: int | None = None) -> TaskSampler:
        return TaskSampler(self.images, ways, shots, queries, seed, offsets=self.offsets, min_shots=min_shots)

    def episodes(self, ways: int, shots: int, queries: int, count: int, seed: int):
        """The same `count` episodes for a given seed (validation and test)."""
        return fixed_episodes(self.images, ways, shots, queries, count, seed, offsets=self.offsets)


@dataclass
class ObjectSplit:
    """A regression split: object k (one task) is rows offsets[k]:offsets[k + 1] of images and targets."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    targets: torch.Tensor  # float32 (N, D)
    offsets: torch.Tensor  # int64 (objects + 1,)

    @property
    def classes(self) -> int:  # objects play the part of classes in size checks
        return len(self.offsets) - 1

    @property
    def smallest_class(self) -> int:
        return int((self.offsets[1:] - self.offsets[:-1]).min())

    def sampler(self, ways: int, shots: int, queries: int, seed: int,
                min_shots: int | None = None) -> ObjectTaskSampler:
        return ObjectTaskSampler(self.images, self.targets, self.offsets, shots, queries, seed, min_shots)

    def episodes(self, ways: int, shots: int, queries: int, count: int, seed: int):
        sampler = self.sampler(ways, shots, queries, seed)
        return (sampler.sample() for _ in range(count))


@dataclass
class FewShotDataset:
    """Disjoint splits (train / val / test) of one data set, and how its tasks are scored.

    Classification sets use ClassSplit, cross-entropy and accuracy; regression sets use ObjectSplit,
    their own loss and metric, `target_dim` outputs, and maybe an output activation for the backbone.
    """

    splits: dict[str, ClassSplit | ObjectSplit]
    name: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    metric: Metric = ACCURACY
    target_dim: int | None = None  # None: classification (the head has task.ways outputs)
    output_activation: str = "none"

    @property
    def regression(self) -> bool:
        return self.target_dim is not None

    @classmethod
    def from_tensors(cls, splits: dict[str, torch.Tensor], name: str) -> "FewShotDataset":
        """From equal-size (classes, instances, C, H, W) uint8 tensors, one per split."""
        return cls({split: ClassSplit.from_tensor(images) for split, images in splits.items()}, name)

    @property
    def channels(self) -> int:
        return next(iter(self.splits.values())).images.shape[1]

    @property
    def image_size(self) -> int:
        return next(iter(self.splits.values())).images.shape[-1]

    @property
    def nbytes(self) -> int:
        """Bytes of every split's images (and regression targets): what `to(device)` copies."""
        return sum(tensor.numel() * tensor.element_size() for split in self.splits.values()
                   for tensor in _per_sample_tensors(split).values())

    def to(self, device: torch.device) -> "FewShotDataset":
        """The same data set with its images (and targets) held on `device`; offsets stay on the CPU, where
        the samplers do their index arithmetic."""
        return replace(self, splits={name: replace(split, **{field: tensor.to(device) for field, tensor
                                                              in _per_sample_tensors(split).items()})
                                     for name, split in self.splits.items()})

    def split(self, name: str) -> ClassSplit:
        if name not in self.splits:
            raise KeyError(f"dataset {self.name}: no split {name!r}; has {sorted(self.splits)}")
        return self.splits[name]


def _per_sample_tensors(split: ClassSplit | ObjectSplit) -> dict[str, torch.Tensor]:
    """The tensors of a split indexed by sample (images; regression targets too), not its offsets."""
    return {field: getattr(split, field) for field in ("images", "targets") if hasattr(split, field)}
