"""Meta-test evaluation: the same seeded episodes for every model, per-episode scores, mean and 95% CI."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

if TYPE_CHECKING:  # annotations only: simt.data imports this module (Metric), so a real import would be circular
    from simt.algorithms.inner_loop import Params
    from simt.data.tasks import Task


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return (outputs.argmax(dim=1) == targets).float().mean().item() * 100.0


@dataclass(frozen=True)
class Metric:
    """What a data set is scored by: `fn(outputs, targets) -> float` per episode, its name in results
    (`test/<name>`), and whether higher is better (which also sets the sweep direction)."""

    fn: Callable[[torch.Tensor, torch.Tensor], float]
    name: str
    higher_is_better: bool


ACCURACY = Metric(accuracy, "acc", higher_is_better=True)


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% interval, 1.96·s/√n (s with n-1)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 episodes, got {n}")
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(variance / n)


def evaluate(learner, models: dict[str, Params], episodes: Iterable[Task], device: torch.device,
             metric: Metric = ACCURACY, total: int | None = None, desc: str = "eval",
             progress: bool = False) -> dict[str, list[float]]:
    """Score every model in `models` (name -> params) on every episode; returns name -> per-episode scores.

    All models see exactly the same episodes, so their per-episode scores can be compared pairwise.
    """
    scores: dict[str, list[float]] = {name: [] for name in models}
    for task in tqdm(episodes, total=total, desc=desc, leave=False, disable=not progress):
        task = task.to(device)
        for name, params in models.items():
            scores[name].append(metric.fn(learner.eval_outputs(params, task), task.query_y))
    return scores


def summarize(scores: dict[str, list[float]], metric_name: str = "acc") -> dict[str, float]:
    """name -> per-episode scores  ==>  {"<name>/<metric>": mean, "<name>/<metric>_ci95": half-width}."""
    summary = {}
    for name, values in scores.items():
        mean, ci = mean_ci95(values)
        summary[f"{name}/{metric_name}"] = mean
        summary[f"{name}/{metric_name}_ci95"] = ci
    return summary
