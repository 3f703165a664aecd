"""Data sets: each builds a FewShotDataset, one uint8 tensor (classes, instances, C, H, W) per split."""
from dataclasses import dataclass

import torch


@dataclass
class FewShotDataset:
    """Class-disjoint splits held in memory. `splits[name]` is uint8 (classes, instances, C, H, W)."""

    splits: dict[str, torch.Tensor]
    name: str

    @property
    def channels(self) -> int:
        return next(iter(self.splits.values())).shape[2]

    @property
    def image_size(self) -> int:
        return next(iter(self.splits.values())).shape[-1]

    def split(self, name: str) -> torch.Tensor:
        if name not in self.splits:
            raise KeyError(f"dataset {self.name}: no split {name!r}; has {sorted(self.splits)}")
        return self.splits[name]

