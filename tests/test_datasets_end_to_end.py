"""The paper's data sets end to end on fixture files: every loader through the pipeline, cross-domain
meta-test, ResNet-12 for both learner families, and bad input as one-line errors."""
import json
import math

import pytest
import torch

import fixtures_images
import fixtures_regression
from simt import pipeline
from tests.conftest import fast, make_cfg, run_cli

SMALL_RESNET = ["backbone=resnet12", "backbone.widths=[4,4,4,4]"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fixtures_images.write_all(tmp_path_factory.mktemp("data"))


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("dataset", ["miniimagenet", "tieredimagenet"])
def test_image_datasets_train_and_test(dataset, data_dir, tmp_path):
    cfg = make_cfg(*fast(f"dataset={dataset}", f"data_dir={data_dir}", "trainer.steps=3"))
    exp = pipeline.build(cfg)
    assert (exp.dataset.channels, exp.dataset.image_size) == (3, 84)
    assert exp.dataset.split("train").classes == 6
    pipeline.run(cfg, tmp_path)
    assert math.isfinite(_results(tmp_path)["test/acc"])


@pytest.mark.parametrize("eval_dataset", ["cub", "cars"])
def test_cross_domain_meta_test(eval_dataset, data_dir, tmp_path):
    cfg = make_cfg(*fast("dataset=miniimagenet", f"eval_dataset={eval_dataset}", f"data_dir={data_dir}",
                         "trainer.steps=3"))
    exp = pipeline.build(cfg)
    assert exp.test_dataset.name == eval_dataset and list(exp.test_dataset.splits) == ["test"]
    pipeline.run(cfg, tmp_path)
    assert _results(tmp_path)["config"]["eval_dataset"]["name"] == eval_dataset


@pytest.mark.parametrize("algo", ["maml", "protonet"])
def test_resnet12_runs_for_both_learner_families(algo, data_dir, tmp_path):
    overrides = [f"algo={algo}", "dataset=miniimagenet", f"data_dir={data_dir}", "trainer.steps=3", *SMALL_RESNET]
    if algo == "protonet":
        overrides.append("algo.train_ways=5")
    cfg = make_cfg(*fast(*overrides))
    exp = pipeline.build(cfg)
    assert (exp.learner.model.classifier is None) == (algo == "protonet")
    pipeline.run(cfg, tmp_path)
    assert math.isfinite(_results(tmp_path)["test/acc"])


def test_missing_data_is_a_one_line_error_naming_the_folder(tmp_path):
    result = run_cli(*fast("dataset=miniimagenet", f"data_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path / "miniimagenet") in lines[0]


@pytest.fixture(scope="module")
def regression_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("regression")
    fixtures_regression.write_shapenet1d(root, samples=8)
    fixtures_regression.write_pascal1d(root, samples=8)
    return root


@pytest.mark.parametrize("dataset,metric,dim", [("shapenet1d", "angular_error", 2), ("pascal1d", "mse", 1)])
@pytest.mark.parametrize("simt", [True, False])
def test_regression_datasets_train_and_test(dataset, metric, dim, simt, regression_dir, tmp_path):
    cfg = make_cfg(*fast(f"dataset={dataset}", f"data_dir={regression_dir}", "backbone=conv_regressor",
                         "backbone.hidden=4", "task.shots=3", "task.queries=4", "trainer.steps=3",
                         f"simt.enabled={simt}"))
    exp = pipeline.build(cfg)
    assert exp.learner.model.classifier.out_features == dim
    assert isinstance(exp.learner.model.output_activation, torch.nn.Tanh) == (dataset == "shapenet1d")
    pipeline.run(cfg, tmp_path)
    results = _results(tmp_path)
    assert math.isfinite(results[f"test/{metric}"]) and results["objective_direction"] == "minimize"
    assert results["val/best"] == min(e["target" if simt else "student"] for e in results["val/history"] if e["selects"])


def test_protonet_on_regression_is_a_config_error(regression_dir):
    cfg = make_cfg(*fast("algo=protonet", "dataset=pascal1d", f"data_dir={regression_dir}", "backbone=conv4"))
    with pytest.raises(pipeline.ConfigError, match="algo='ProtoNet': expected a gradient-based learner"):
        pipeline.build(cfg)


def test_kanji_pose_builds_and_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMT_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(*fast("dataset=kanji_pose", "dataset.split_classes={train: 6, val: 3, test: 3}",
                         "dataset.samples_per_object=8", "dataset.image_size=32", "task.shots=3",
                         "task.queries=4", "trainer.steps=3"))
    pipeline.run(cfg, tmp_path / "run")
    assert math.isfinite(_results(tmp_path / "run")["test/mse"])


def test_conv4_on_regression_warns_about_inner_loop_divergence(regression_dir, caplog):
    cfg = make_cfg(*fast("dataset=pascal1d", f"data_dir={regression_dir}", "backbone=conv4"))
    with caplog.at_level("WARNING", logger="simt.pipeline"):
        pipeline.build(cfg)
    assert "backbone=conv_regressor" in caplog.text


def test_shapenet1d_random_support_size_per_meta_batch(regression_dir, tmp_path):
    """task.min_shots (the official ShapeNet1D training): one support size per meta-batch, drawn from
    [min_shots, shots], queries fixed; evaluation keeps task.shots; a run trains with the batched engine
    too (one shape per meta-batch)."""
    cfg = make_cfg(*fast("dataset=shapenet1d", f"data_dir={regression_dir}", "backbone=conv_regressor",
                         "backbone.hidden=4", "task.shots=4", "task.min_shots=2", "task.queries=3",
                         "trainer.steps=3", "algo.engine=batched"))
    exp = pipeline.build(cfg)
    sampler = exp.dataset.split("train").sampler(1, 4, 3, seed=0, min_shots=2)
    sizes = set()
    for _ in range(30):
        batch = sampler.sample_meta_batch(3)
        shapes = {len(task.support_x) for task in batch}
        assert len(shapes) == 1 and all(len(task.query_x) == 3 for task in batch)
        sizes |= shapes
    assert sizes == {2, 3, 4}
    assert all(len(t.support_x) == 4 for t in exp.dataset.split("val").episodes(1, 4, 3, count=5, seed=0))
    pipeline.run(cfg, tmp_path)
    assert math.isfinite(_results(tmp_path)["test/angular_error"])


def test_without_min_shots_a_meta_batch_is_the_plain_task_stream(data_dir):
    """No extra random draw: resumed runs and old checkpoints see the same tasks as before."""
    exp = pipeline.build(make_cfg(*fast()))
    split = exp.dataset.split("train")
    batch = split.sampler(5, 1, 5, seed=7).sample_meta_batch(3)
    single = split.sampler(5, 1, 5, seed=7)
    for task in batch:
        assert torch.equal(task.support_x, single.sample().support_x)


def test_min_shots_above_shots_is_a_config_error():
    with pytest.raises(pipeline.ConfigError, match=r"task.min_shots=6: expected null or at most task.shots=5"):
        pipeline.check_config(make_cfg(*fast("task.shots=5", "task.min_shots=6")))


@pytest.mark.parametrize("dataset", ["kanji_pose", "shapenet1d", "pascal1d"])
def test_regression_data_sets_default_to_the_conv_regressor_unless_told(dataset):
    """Conv4 flattens too many features for MAML's inner SGD on MSE at the default rate (it diverges);
    the official regression backbone is the default, and the command line still chooses."""
    assert make_cfg(f"dataset={dataset}").backbone._target_.endswith("ConvRegressor")
    assert make_cfg(f"dataset={dataset}", "backbone=conv4").backbone._target_.endswith("Conv4")
    assert make_cfg("dataset=kanji").backbone._target_.endswith("Conv4")
