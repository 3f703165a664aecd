"""Evaluation statistics and fixed episodes; ProtoNet geometry; task sampling."""
import math

import pytest
import torch

from simt.algorithms.protonet import prototype_logits, prototypes
from simt.data.tasks import TaskSampler, fixed_episodes
from simt.evaluator import ACCURACY, Metric, accuracy, mean_ci95, summarize


def test_ci_formula_on_known_numbers():
    mean, ci = mean_ci95([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    # sample std of 1..4 is sqrt(5/3); 1.96 * sqrt(5/3) / sqrt(4)
    assert ci == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)
    assert mean_ci95([7.0, 7.0, 7.0]) == (7.0, 0.0)
    with pytest.raises(ValueError, match="at least 2 episodes"):
        mean_ci95([1.0])


def test_summarize_names_model_and_metric():
    summary = summarize({"student": [50.0, 70.0], "target": [60.0, 60.0]})
    assert summary["student/acc"] == 60.0 and summary["target/acc_ci95"] == 0.0
    assert set(summary) == {"student/acc", "student/acc_ci95", "target/acc", "target/acc_ci95"}


def test_accuracy_in_percent():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == 75.0


def _images(classes=10, instances=8, size=4):
    return torch.randint(0, 256, (classes, instances, 1, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def test_same_seed_same_episodes_and_different_seed_different():
    images = _images()
    first = list(fixed_episodes(images, 5, 1, 3, count=4, seed=7))
    again = list(fixed_episodes(images, 5, 1, 3, count=4, seed=7))
    other = list(fixed_episodes(images, 5, 1, 3, count=4, seed=8))
    assert all(torch.equal(a.query_x, b.query_x) and torch.equal(a.support_x, b.support_x)
               for a, b in zip(first, again))
    assert not all(torch.equal(a.query_x, b.query_x) for a, b in zip(first, other))


def test_task_shapes_labels_and_disjoint_support_query():
    images = torch.arange(10 * 8, dtype=torch.uint8).view(10, 8, 1, 1, 1).expand(10, 8, 1, 4, 4).contiguous()
    task = TaskSampler(images, ways=5, shots=2, queries=3, seed=0).sample()
    assert task.support_x.shape == (10, 1, 4, 4) and task.query_x.shape == (15, 1, 4, 4)
    assert task.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert task.ways == 5 and task.to(torch.device("cpu")).ways == 5  # known without reading the labels
    assert 0.0 <= task.support_x.min() and task.support_x.max() <= 1.0
    ids = lambda x: set((x[:, 0, 0, 0] * 255).round().long().tolist())  # noqa: E731  image id = class*8+instance
    assert not ids(task.support_x) & ids(task.query_x)
    # every image of a way comes from one class
    for way in range(5):
        classes = {i // 8 for i in ids(task.support_x[task.support_y == way]) | ids(task.query_x[task.query_y == way])}
        assert len(classes) == 1


def test_sampler_state_round_trip():
    images = _images()
    sampler = TaskSampler(images, 5, 1, 3, seed=0)
    sampler.sample()
    state = sampler.state_dict()
    expected = sampler.sample()
    sampler.load_state_dict(state)
    assert torch.equal(sampler.sample().query_x, expected.query_x)


def test_sampler_rejects_impossible_tasks():
    with pytest.raises(ValueError, match="task.ways=11: the split has only 10 classes"):
        TaskSampler(_images(), 11, 1, 3, seed=0)
    with pytest.raises(ValueError, match="task.shots\\+task.queries=9: the smallest class"):
        TaskSampler(_images(), 5, 1, 8, seed=0)


def test_prototypes_are_class_means_and_logits_have_shape_queries_by_ways():
    support = torch.tensor([[0.0, 0.0], [2.0, 2.0], [10.0, 0.0], [12.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(prototypes(support, labels, 2), torch.tensor([[1.0, 1.0], [11.0, 0.0]]))
    query = torch.tensor([[1.0, 1.0], [11.0, 0.0], [5.0, 0.0]])
    logits = prototype_logits(support, labels, query)
    assert logits.shape == (3, 2)
    torch.testing.assert_close(logits[0], torch.tensor([0.0, -101.0]))
    assert logits.argmax(1).tolist() == [0, 1, 0]


def test_ragged_splits_sample_within_each_class():
    sizes = [4, 9, 5, 7, 6, 12]
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    # image i carries its class id in every pixel
    images = torch.cat([torch.full((n, 1, 2, 2), c, dtype=torch.uint8) for c, n in enumerate(sizes)])
    sampler = TaskSampler(images, ways=4, shots=1, queries=3, seed=0, offsets=offsets)
    for _ in range(20):
        task = sampler.sample()
        for way in range(4):
            pixels = torch.cat([task.support_x[task.support_y == way], task.query_x[task.query_y == way]])
            assert len(set((pixels * 255).round().long().flatten().tolist())) == 1
    with pytest.raises(ValueError, match="task.shots\\+task.queries=5: the smallest class of the split has only 4"):
        TaskSampler(images, ways=2, shots=2, queries=3, seed=0, offsets=offsets)


def test_equal_size_and_flat_layouts_give_the_same_tasks():
    images = _images()
    flat = images.reshape(-1, *images.shape[2:])
    offsets = torch.arange(images.shape[0] + 1) * images.shape[1]
    a = TaskSampler(images, 5, 1, 3, seed=3).sample()
    b = TaskSampler(flat, 5, 1, 3, seed=3, offsets=offsets).sample()
    assert torch.equal(a.query_x, b.query_x) and torch.equal(a.support_x, b.support_x)


def test_modules_import_on_their_own():
    # Each in a fresh interpreter: an import cycle only shows when its module is the first one imported.
    import subprocess
    import sys

    for name in ("simt.evaluator", "simt.trainer", "simt.momentum", "simt.data.tasks"):
        done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
        assert done.returncode == 0, f"{name}: {done.stderr.strip().splitlines()[-1]}"


def test_a_chunk_of_episodes_is_scored_in_one_read_with_the_per_episode_numbers():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 15, 5, generator=g), torch.randint(0, 5, (6, 15), generator=g)
    per_episode = [accuracy(out, y) for out, y in zip(logits, labels)]
    assert ACCURACY.scores(list(logits), list(labels)) == per_episode  # the same floats, not approximately
    assert ACCURACY.total(logits[:2], labels[:2]).item() == per_episode[0] + per_episode[1]
    plain = Metric(lambda out, y: float(out.sum() - y.sum()), "plain", higher_is_better=False)  # no `values`
    plain_scores = [float(o.sum() - y.sum()) for o, y in zip(logits, labels)]
    assert plain.scores(list(logits), list(labels)) == plain_scores
    total = plain.total(logits[:2], labels[:2])
    assert total.dtype == torch.float64 and total.item() == plain_scores[0] + plain_scores[1]


@pytest.mark.parametrize("name", ["mse", "angular_error"])
def test_regression_metrics_score_a_stack_of_episodes_as_one_at_a_time(name):
    """Their `values` (a stack, on the device) give each episode's number, as the per-episode function and an
    independent per-episode computation (F.mse_loss in float64; the mean of the per-sample angles)."""
    from simt.data.regression import angular_error, angular_error_degrees, angular_error_values, mse, mse_values

    fn, values, reference = {
        "mse": (mse, mse_values, lambda out, y: torch.nn.functional.mse_loss(out.double(), y.double()).item()),
        "angular_error": (angular_error, angular_error_values,
                          lambda out, y: angular_error_degrees(out, y).double().mean().item()),
    }[name]
    g = torch.Generator().manual_seed(0)
    outputs, targets = torch.randn(4, 6, 2, generator=g), torch.randn(4, 6, 2, generator=g)
    per_episode = [fn(out, y) for out, y in zip(outputs, targets)]
    assert per_episode == pytest.approx([reference(out, y) for out, y in zip(outputs, targets)], rel=1e-12)
    torch.testing.assert_close(values(outputs, targets), torch.tensor(per_episode, dtype=torch.float64),
                               rtol=1e-15, atol=0)
    assert Metric(fn, name, higher_is_better=False, values=values).scores(list(outputs), list(targets)) == \
        pytest.approx(per_episode, rel=1e-15)


@pytest.mark.parametrize("ragged", [False, True])
def test_a_task_is_drawn_with_few_ops_and_comes_out_contiguous(ragged):
    """Sampling is the per-episode cost of a batched evaluation on a GPU: one gather, support and query
    contiguous from it, labels made once per sampler."""
    from benchmarks.bench import count_ops

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 1, 8, 8), dtype=torch.uint8, generator=g)
    offsets = torch.tensor([0, 12, 30, 42, 60]) if ragged else torch.arange(0, 61, 12)
    sampler = TaskSampler(images, 3, 2, 4, seed=0, offsets=offsets)
    first, second = sampler.sample(), sampler.sample()
    assert first.support_x.is_contiguous() and first.query_x.is_contiguous()
    assert second.support_y is first.support_y and second.query_y is first.query_y
    assert count_ops(sampler.sample) <= (30 if ragged else 20)  # ragged classes: a mask for the shorter ones
