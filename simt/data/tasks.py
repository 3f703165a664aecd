"""Few-shot tasks: class-grouped images in, (support, query) episodes out.

A split is one uint8 image tensor with the images of each class contiguous, plus class offsets, held in
memory (or memory-mapped), so sampling a task is pure indexing: no decoding, no per-sample Python.
The images may live on the training device (`trainer.data_on_device`): the samplers draw the indices on
the CPU with their own generator (so the episode stream is the same bits on every device) and gather
the episode's images with one indexing op where the images are, so a task never crosses the PCIe bus.
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
    # The number of classes, where the sampler knows it (None: regression, or not given): ProtoNet then need
    # not read the labels' maximum back from a GPU, which would stall the CPU in the middle of a step.
    ways: int | None = None

    def to(self, device: torch.device) -> "Task":
        return Task(*(t.to(device, non_blocking=True) for t in (self.support_x, self.support_y,
                                                                 self.query_x, self.query_y)), ways=self.ways)


# k / 255 for every uint8 value k, divided once on the CPU. Gathering from this table gives the same bits on
# every device: CUDA divides a tensor by a scalar as a multiplication by its reciprocal, which differs from
# the CPU's true division in the last bit for some k, so tasks sampled on a GPU would not be the CPU's tasks.
_UNIT_PIXELS = torch.arange(256, dtype=torch.float32) / 255
_unit_pixels_on: dict[torch.device, torch.Tensor] = {}


def unit_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 as float32 in [0, 1] (k / 255, correctly rounded), on the images' device."""
    table = _unit_pixels_on.get(images.device)
    if table is None:
        table = _unit_pixels_on[images.device] = _UNIT_PIXELS.to(images.device)
    return table[images.int()]


def class_layout(images: torch.Tensor, offsets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise a split to (images (N, C, H, W), offsets (classes + 1,)).

    Accepts an equal-size split (classes, instances, C, H, W) with no offsets, or flat images whose class k
    occupies rows offsets[k]:offsets[k + 1] (data sets with a varying number of images per class).
    """
    if offsets is None:
        if images.dim() != 5:
            raise ValueError(f"expected images (classes, instances, C, H, W), got {tuple(images.shape)}")
        classes, instances = images.shape[:2]
        return images.reshape(classes * instances, *images.shape[2:]), torch.arange(classes + 1) * instances
    if images.dim() != 4 or offsets.dim() != 1 or int(offsets[-1]) != images.shape[0]:
        raise ValueError(f"expected images (N, C, H, W) and offsets ending at N, got {tuple(images.shape)} "
                         f"and offsets {tuple(offsets.shape)}")
    return images, offsets.long()


class MetaBatchSampling:
    """What the trainer calls: `sample_meta_batch(n)`. With `min_shots` set, each meta-batch draws its
    support size uniformly from [min_shots, shots] (the official ShapeNet1D training: 3 to shot_max), the
    same for all its tasks, so a meta-batch keeps one shape (the batched engine stacks it); the number of
    queries stays fixed. Without it, exactly the tasks `sample()` draws one after another."""

    shots: int
    min_shots: int | None = None
    generator: torch.Generator

    def sample(self, shots: int | None = None) -> Task:
        raise NotImplementedError

    def sample_meta_batch(self, size: int) -> list[Task]:
        shots = None
        if self.min_shots is not None:
            shots = int(torch.randint(self.min_shots, self.shots + 1, (1,), generator=self.generator))
        return [self.sample(shots) for _ in range(size)]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def _check_min_shots(min_shots: int | None, shots: int) -> None:
    if min_shots is not None and not 1 <= min_shots <= shots:
        raise ValueError(f"task.min_shots={min_shots}: expected null or an integer in [1, task.shots={shots}]")


class TaskSampler(MetaBatchSampling):
    """Draws N-way K-shot episodes from one split with its own seeded generator.

    The generator is private (not torch's global RNG), so the episode stream depends only on the seed and
    on how many tasks were drawn before: checkpointing `state_dict()` makes resumed runs bitwise exact.
    """

    def __init__(self, images: torch.Tensor, ways: int, shots: int, queries: int, seed: int,
                 offsets: torch.Tensor | None = None, min_shots: int | None = None):
        _check_min_shots(min_shots, shots)
        if images.dtype != torch.uint8:
            raise ValueError(f"TaskSampler: expected uint8 images, got {images.dtype}")
        self.images, self.offsets = class_layout(images, offsets)
        self.counts = self.offsets[1:] - self.offsets[:-1]
        classes, smallest = len(self.counts), int(self.counts.min())
        if ways > classes:
            raise ValueError(f"task.ways={ways}: the split has only {classes} classes")
        if shots + queries > smallest:
            raise ValueError(f"task.shots+task.queries={shots + queries}: the smallest class of the split has "
                             f"only {smallest} images")
        self.ways, self.shots, self.queries, self.min_shots = ways, shots, queries, min_shots
        self.generator = torch.Generator().manual_seed(seed)
        self.class_size = smallest if bool((self.counts == smallest).all()) else None  # None: sizes differ
        self._labels: dict[int, torch.Tensor] = {}

    def sample(self, shots: int | None = None) -> Task:
        """One episode; `shots` (at most task.shots) overrides the support size for it.

        Few ops per episode (it is the per-episode cost of a batched evaluation on a GPU): the indices are
        drawn on the CPU, the images gathered with one indexing op, support and query rows in one index
        so that both come out contiguous, and the labels (the same in every episode) made once."""
        shots = shots or self.shots
        picked = torch.randperm(len(self.counts), generator=self.generator)[: self.ways]
        # A random subset of each picked class: sort random keys, with the keys of slots past a class's
        # size pushed to the end, and keep the first shots+queries.
        width = self.class_size or int(self.counts[picked].max())
        keys = torch.rand(self.ways, width, generator=self.generator)
        if self.class_size is None:
            keys[torch.arange(width) >= self.counts[picked][:, None]] = 2.0
        order = keys.argsort(dim=1)[:, : shots + self.queries] + self.offsets[picked][:, None]
        rows = torch.cat((order[:, :shots].flatten(), order[:, shots:].flatten()))  # class by class, support first
        images = unit_pixels(self.images[rows.to(self.images.device)])
        support = self.ways * shots
        return Task(images[:support], self._labels_of(shots), images[support:], self._labels_of(self.queries),
                    ways=self.ways)

    def _labels_of(self, per_class: int) -> torch.Tensor:
        """0..ways-1, each `per_class` times, on the images' device (one tensor shared by the episodes)."""
        labels = self._labels.get(per_class)
        if labels is None:
            labels = self._labels[per_class] = torch.arange(self.ways, device=self.images.device).repeat_interleave(
                per_class)
        return labels


class ObjectTaskSampler(MetaBatchSampling):
    """Regression episodes: one object per task (one glyph, one ShapeNet/Pascal object), `shots` support
    and `queries` query samples drawn from its images without replacement; y are float targets."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, offsets: torch.Tensor, shots: int,
                 queries: int, seed: int, min_shots: int | None = None):
        _check_min_shots(min_shots, shots)
        self.images, self.targets, self.offsets = images, targets, offsets.long()
        self.counts = self.offsets[1:] - self.offsets[:-1]
        if shots + queries > int(self.counts.min()):
            raise ValueError(f"task.shots+task.queries={shots + queries}: the smallest object of the split has "
                             f"only {int(self.counts.min())} samples")
        self.shots, self.queries, self.min_shots = shots, queries, min_shots
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, shots: int | None = None) -> Task:
        shots = shots or self.shots
        obj = int(torch.randint(len(self.counts), (1,), generator=self.generator))
        rows = torch.randperm(int(self.counts[obj]), generator=self.generator)[: shots + self.queries]
        rows = (rows + self.offsets[obj]).to(self.images.device)
        images, targets = unit_pixels(self.images[rows]), self.targets[rows]
        return Task(images[:shots], targets[:shots], images[shots:], targets[shots:])


def fixed_episodes(images: torch.Tensor, ways: int, shots: int, queries: int, count: int, seed: int,
                   offsets: torch.Tensor | None = None):
    """The same `count` episodes every time for a given seed and split (a fresh sampler each call)."""
    sampler = TaskSampler(images, ways, shots, queries, seed, offsets)
    for _ in range(count):
        yield sampler.sample()
