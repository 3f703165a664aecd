"""A tiny synthetic few-shot data set for tests: each class is a random smooth pattern, each instance a
noisy, slightly shifted copy. Learnable in a few steps, built in milliseconds."""
import torch
import torch.nn.functional as F

from simt.data import FewShotDataset


def synthetic(split_classes: dict[str, int], instances: int, image_size: int = 16, channels: int = 1,
              noise: float = 0.25, seed: int = 0) -> FewShotDataset:
    generator = torch.Generator().manual_seed(seed)
    splits = {}
    for name, classes in split_classes.items():
        # Class patterns: low-resolution noise upsampled, so classes differ in large-scale structure.
        coarse = torch.rand(classes, 1, channels, 4, 4, generator=generator)
        pattern = F.interpolate(coarse.flatten(0, 1), size=image_size, mode="bilinear", align_corners=False)
        pattern = pattern.view(classes, 1, channels, image_size, image_size)
        noisy = pattern + noise * torch.randn(classes, instances, channels, image_size, image_size,
                                              generator=generator)
        splits[name] = (noisy.clamp(0, 1) * 255).round().to(torch.uint8)
    return FewShotDataset.from_tensors(splits, name="synthetic")
