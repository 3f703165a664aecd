"""Few-shot tasks: a class-split image tensor in, (support, query) episodes out.

A split is one uint8 tensor of shape (classes, instances, C, H, W) held in memory, so sampling a task is
pure indexing: no decoding, no per-sample Python.
"""
from dataclasses import dataclass

import torch


@dataclass
class Task:
    """One episode. Images float in [0, 1]; labels 0..ways-1, grouped by class (shots or queries each)."""

    support_x: torch.Tensor  # (ways * shots, C, H, W)
    support_y: torch.Tensor  # (ways * shots,) int64
    query_x: torch.Tensor  # (ways * queries, C, H, W)
    query_y: torch.Tensor  # (ways * queries,) int64

    def to(self, device: torch.device) -> "Task":
        return Task(*(t.to(device, non_blocking=True) for t in (self.support_x, self.support_y,
                                                                 self.query_x, self.query_y)))


class TaskSampler:
    """Draws N-way K-shot episodes from one split with its own seeded generator.

    The generator is private (not torch's global RNG), so the episode stream depends only on the seed and
    on how many tasks were drawn before: checkpointing `state_dict()` makes resumed runs bitwise exact.
    """

    def __init__(self, images: torch.Tensor, ways: int, shots: int, queries: int, seed: int):
        if images.dtype != torch.uint8 or images.dim() != 5:
            raise ValueError(f"TaskSampler: expected a uint8 tensor (classes, instances, C, H, W), "
                             f"got {images.dtype} {tuple(images.shape)}")
        classes, instances = images.shape[:2]
        if ways > classes:
            raise ValueError(f"task.ways={ways}: the split has only {classes} classes")
        if shots + queries > instances:
            raise ValueError(f"task.shots+task.queries={shots + queries}: the split has only {instances} "
                             f"images per class")
        self.images, self.ways, self.shots, self.queries = images, ways, shots, queries
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> Task:
        classes, instances = self.images.shape[:2]
        picked = torch.randperm(classes, generator=self.generator)[: self.ways]
        # One random permutation of the instances per picked class, first shots+queries of each.
        order = torch.rand(self.ways, instances, generator=self.generator).argsort(dim=1)
        order = order[:, : self.shots + self.queries]
        images = self.images[picked[:, None], order].float().div_(255)  # (ways, shots+queries, C, H, W)
        labels = torch.arange(self.ways)
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731  (ways, n, ...) -> (ways * n, ...)
        return Task(
            support_x=flat(images[:, : self.shots]),
            support_y=labels.repeat_interleave(self.shots),
            query_x=flat(images[:, self.shots:]),
            query_y=labels.repeat_interleave(self.queries),
        )

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def fixed_episodes(images: torch.Tensor, ways: int, shots: int, queries: int, count: int, seed: int):
    """The same `count` episodes every time for a given seed and split (a fresh sampler each call)."""
    sampler = TaskSampler(images, ways, shots, queries, seed)
    for _ in range(count):
        yield sampler.sample()
