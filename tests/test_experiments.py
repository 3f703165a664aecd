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
    # The acceptance command (which validates on 4 episodes too: val_tasks follows a smaller eval_tasks).
    cfg = make_cfg(f"experiment={experiment}", f"data_dir={data_dir}", "trainer.steps=3", "trainer.eval_tasks=4",
                   "trainer.threads=1")
    pipeline.run(cfg, tmp_path)
    results = json.loads((Path(tmp_path) / "results.json").read_text())
    assert math.isfinite(results["objective"])


def test_experiment_rows_script_runs_rows_and_reports_the_ones_it_did_not_start(tmp_path):
    """benchmarks/experiment_rows.py (the acceptance command for every row, one process; GPU sessions run it):
    a row runs and is reported with its objective; past --budget no row starts, and the table says which."""
    from benchmarks import experiment_rows

    assert experiment_rows.rows("resnet12", None, "both")[:2] == [("miniimagenet_resnet12_1shot_anil", True),
                                                                   ("miniimagenet_resnet12_1shot_anil", False)]
    everything = experiment_rows.rows(None, None, "on")
    assert all("resnet12" in name for name, _ in everything[:16]) and len(everything) == len(EXPERIMENTS)
    halves = [experiment_rows.rows(None, "resnet12", "both", (k, 2)) for k in (0, 1)]
    assert sorted(halves[0] + halves[1]) == sorted(experiment_rows.rows(None, "resnet12", "both"))
    with pytest.raises(SystemExit):
        experiment_rows.main(["--shard", "2/2"])

    out = tmp_path / "rows.md"
    assert experiment_rows.main(["--only", "kanji_pose", "--simt", "off", "--out", str(out),
                                 "trainer.val_tasks=2", "trainer.threads=1"]) == 0
    text = out.read_text()
    assert "| kanji_pose_maml | no | cpu |" in text and "1 of 1 rows ran and gave a finite objective." in text
    assert experiment_rows.main(["--only", "shapenet1d", "--budget", "0", "--out", str(out)]) == 0
    assert ("0 of 0 rows ran and gave a finite objective; 6 not started (--budget spent): shapenet1d_anil, "
            "shapenet1d_anil (baseline), shapenet1d_maml") in out.read_text()
