"""Every paper-row experiment file runs end to end on fixture files (slow: `make test-all`)."""
import json
import math
from pathlib import Path

import pytest

import fixtures_images
import fixtures_regression
from simt import pipeline
from tests.conftest import ROOT, make_cfg

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    # ProtoNet trains 20-way, so the train split needs 20 classes; regression rows need 20 samples.
    fixtures_images.write_all(root, classes_per_split={"train": 20, "val": 5, "test": 5})
    fixtures_regression.write_shapenet1d(root, samples=20)
    fixtures_regression.write_pascal1d(root, samples=20)
    return root


def test_there_is_a_row_per_paper_setting():
    assert len([e for e in EXPERIMENTS if e.split("_")[0] in ("miniimagenet", "tieredimagenet")
                and "_to_" not in e]) == 32
    assert {e for e in EXPERIMENTS if "_to_" in e} >= {"miniimagenet_to_cub_conv4_5shot_maml",
                                                      "miniimagenet_to_cars_conv4_1shot_protonet"}
    assert {"shapenet1d_maml", "pascal1d_metasgd"} <= set(EXPERIMENTS)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_on_fixtures(experiment, data_dir, tmp_path):
    # The acceptance command, plus few validation episodes: trainer=paper validates on 500 (hours of
    # CPU for ResNet-12 at 84x84).
    cfg = make_cfg(f"experiment={experiment}", f"data_dir={data_dir}", "trainer.steps=3", "trainer.eval_tasks=4",
                   "trainer.val_tasks=2", "trainer.threads=1")
    pipeline.run(cfg, tmp_path)
    results = json.loads((Path(tmp_path) / "results.json").read_text())
    assert math.isfinite(results["objective"])
