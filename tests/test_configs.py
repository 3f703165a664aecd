"""Every config option composes and builds; bad values fail before any work with one line."""
from pathlib import Path

import pytest
import torch

from simt import pipeline
from tests.conftest import FAST, ROOT, fast, make_cfg, run_cli

OPTIONS = {group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")) for group in pipeline.GROUPS}


def test_groups_have_the_documented_options():
    assert OPTIONS["algo"] == ["anil", "fomaml", "maml", "metasgd", "protonet"]
    assert {"kanji", "synthetic"} <= set(OPTIONS["dataset"])


BUILT_HERE = [(g, o) for g, opts in OPTIONS.items() for o in opts
              if g not in ("dataset", "eval_dataset", "experiment")]  # those read data: tested end to end


@pytest.mark.parametrize("group,option", BUILT_HERE)
def test_every_option_composes_and_builds(group, option):
    cfg = make_cfg(*fast(f"{group}={option}"))
    assert cfg[group] is not None if group != "experiment" else True
    pipeline.check_config(cfg)
    exp = pipeline.build(cfg)
    assert exp.learner.meta_parameters()
    assert (exp.target is not None) == cfg.simt.enabled


@pytest.mark.parametrize("group", ["dataset", "eval_dataset", "experiment"])
def test_every_data_and_experiment_option_composes_and_validates(group):
    for option in OPTIONS[group]:
        cfg = make_cfg(f"{group}={option}")
        pipeline.check_config(cfg)
        assert cfg[group.replace("experiment", "task")]


@pytest.mark.parametrize("algo,keys", [
    ("fomaml", {"first_order": True}), ("anil", {"adapt_scope": "head"}),
    ("metasgd", {"lr_shape": "element"}), ("protonet", {"train_ways": 20}),
])
def test_algorithm_variants_set_their_keys(algo, keys):
    cfg = make_cfg(f"algo={algo}")
    assert {k: cfg.algo[k] for k in keys} == keys


def test_every_paper_row_keeps_the_papers_simt_values():
    paper_rows = [name for name in OPTIONS["experiment"]
                  if "override /trainer: paper" in (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text()]
    assert len(paper_rows) == 54
    for name in paper_rows:
        simt = make_cfg(f"experiment={name}").simt
        assert (simt.enabled, simt.eta, simt.eta_schedule, simt.lam, simt.drop_p, simt.temp) == \
            (True, 0.995, "constant", 0.5, 0.0, 4.0), name


def test_protonet_gets_an_embedding_backbone_with_running_stats():
    exp = pipeline.build(make_cfg(*FAST, "algo=protonet"))
    assert exp.learner.model.classifier is None
    assert any("running_mean" in name for name, _ in exp.learner.model.named_buffers())
    assert "features.layer1.norm.running_mean" in exp.target.params


def test_dropout_only_with_simt():
    with_simt = pipeline.build(make_cfg(*FAST, "simt.drop_p=0.2")).learner.model
    baseline = pipeline.build(make_cfg(*FAST, "simt.drop_p=0.2", "simt.enabled=false")).learner.model
    assert any(isinstance(m, torch.nn.Dropout) for m in with_simt.modules())
    assert not any(isinstance(m, torch.nn.Dropout) for m in baseline.modules())


@pytest.mark.parametrize("overrides,val_tasks", [
    ((), 50), (("trainer=paper",), 500),
    (("trainer=paper", "trainer.eval_tasks=4"), 4),  # a smoke run of a paper row validates on 4, not 500
    (("trainer=paper", "trainer.eval_tasks=4", "trainer.val_tasks=500"), 500),  # a number set by the user wins
    (("trainer.eval_tasks=10",), 10),
])
def test_validation_uses_at_most_the_test_episodes_unless_set(overrides, val_tasks):
    assert make_cfg(*overrides).trainer.val_tasks == val_tasks


def test_a_bad_test_episode_count_is_reported_before_the_validation_count_computed_from_it():
    with pytest.raises(pipeline.ConfigError, match=r"^trainer.eval_tasks='many': expected an integer in 2\.\.1,000,000"):
        pipeline.check_config(make_cfg(*FAST, "trainer.eval_tasks=many"))


@pytest.mark.parametrize("override,message", [
    ("simt.eta=1.5", "simt.eta=1.5: expected a number in [0, 1]"),
    ("simt.lam=-1", "simt.lam=-1: expected a number in [0, 1]"),
    ("simt.drop_p=1", "simt.drop_p=1: expected a number in [0, 1)"),
    ("simt.temp=0", "simt.temp=0: expected a number in (0, 3.403e+38] (finite in float32)"),
    ("task.ways=9", "task.ways=9: expected at most 8 (classes in the val split of dataset synthetic)"),
    ("task.queries=30", "task.shots+task.queries=31: expected at most 20 (images in the smallest class or object of dataset synthetic)"),
    ("trainer.steps=0", "trainer.steps=0: expected an integer in 1..1,000,000,000"),
    ("trainer.device=tpu", "trainer.device='tpu': expected auto, cpu, cuda or cuda:N"),
    ("trainer.tasks_per_backward=0", "trainer.tasks_per_backward=0: expected null or an integer in 1..1,024"),
])
def test_invalid_values_give_one_line_errors(override, message):
    with pytest.raises(pipeline.ConfigError) as error:
        pipeline.check_config(make_cfg(*FAST, override))
    assert str(error.value) == message


def test_protonet_train_ways_must_fit_the_train_split():
    with pytest.raises(pipeline.ConfigError, match=r"algo.train_ways=20: expected at most 8 \(classes in the"):
        pipeline.check_config(make_cfg("dataset=synthetic", "algo=protonet", "dataset.split_classes.train=8"))


@pytest.mark.parametrize("args,message", [
    (["simt.eta=1.5"], "error: simt.eta=1.5: expected a number in [0, 1]"),
    (["algo=nope"], "error: algo='nope': expected one of anil, fomaml, maml, metasgd, protonet"),
    (["-m", "algo=maml,nope"], "error: algo='nope': expected one of anil, fomaml, maml, metasgd, protonet"),
    (["simt.etaa=1"], "error: Could not override 'simt.etaa'. To append to your config use +simt.etaa=1"),
    (["algo.adapt_scope=body"], "error: algo.adapt_scope='body': expected one of all, head"),
    (["dataset.image_size=8"], "error: dataset.image_size=8: expected an integer in 16..1,024 (Conv4 max-pools 4 "
                                "times; a 1024x1024 image's first activations take 268 MB at 64 channels)"),
])
def test_cli_errors_are_one_line_without_traceback(args, message, tmp_path):
    result = run_cli(*FAST, f"hydra.run.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}", *args)
    assert result.returncode != 0
    assert result.stderr.strip() == message
    assert not (Path(tmp_path) / "last.pt").exists()


@pytest.mark.parametrize("compat", ["paper", "official"])
def test_compat_passes_plain_constructor_arguments(compat):
    official = compat == "official"
    protonet = pipeline.build(make_cfg(*fast("algo=protonet", f"compat={compat}")))
    assert protonet.learner.shares_batch_statistics == official and protonet.target.sum_over_queries == official
    assert protonet.learner.engine == ("batched" if official else "loop")  # one pass needs the tasks stacked
    anil = pipeline.build(make_cfg(*fast("algo=anil", f"compat={compat}"))).learner
    body = [key for key in anil.meta_parameters() if key.startswith("features.") and ".conv." in key]
    assert bool(set(body) & set(anil.momentum_keys)) != official  # official: the target averages the head only
    metasgd = pipeline.build(make_cfg(*fast("algo=metasgd", f"compat={compat}"))).learner
    assert all((rate.dim() == 0) == official for rate in metasgd.inner_lrs.values())
    maml = pipeline.build(make_cfg(*fast(f"compat={compat}"))).learner  # no departure for MAML itself
    assert maml.momentum_scope == "model"
    resnet = make_cfg(*fast("algo=protonet", "backbone=resnet12", "backbone.widths=[4,4,4,4]", "simt.drop_p=0.3",
                            f"compat={compat}"))
    dropouts = [m for m in pipeline.build(resnet).learner.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert bool(dropouts) != official  # the official ProtoNet ResNet-12 never drops


@pytest.mark.parametrize("algo", ["maml", "fomaml", "anil", "metasgd", "protonet"])
def test_every_algorithm_trains_under_compat_official(algo, tmp_path):
    pipeline.run(make_cfg(*fast(f"algo={algo}", "compat=official", "simt.drop_p=0.1")), tmp_path)
    assert (tmp_path / "results.json").is_file()
