"""The reproduce-table aggregation: statistics against hand computations, failed/missing cells, outputs.

Run directories are written by hand (results.json with known per-episode scores); nothing is trained.
"""
import csv
import json
import math

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from simt.table import (RunKey, TableError, aggregate, algorithm_label, load_published, load_runs, mean_ci95,
                        write_outputs)
from tests.conftest import ROOT, make_cfg

ALGO = {  # the algo configs, as conf/algo/*.yaml resolve them (test_labels_of_the_real_algo_configs checks)
    "maml": {"_target_": "simt.algorithms.GradientLearner", "first_order": False, "adapt_scope": "all"},
    "fomaml": {"_target_": "simt.algorithms.GradientLearner", "first_order": True, "adapt_scope": "all"},
    "anil": {"_target_": "simt.algorithms.GradientLearner", "first_order": False, "adapt_scope": "head"},
    "metasgd": {"_target_": "simt.algorithms.MetaSGD", "first_order": False, "adapt_scope": "all"},
    "protonet": {"_target_": "simt.algorithms.ProtoNet", "train_ways": 20},
}
PROTOCOL = {"BN mode": "transductive (MAML family)"}


def config(algo="maml", simt=False, seed=0, shots=1, dataset="synthetic", episode_seed=0, **extra) -> dict:
    return {"algo": {**ALGO[algo], "inner_steps": 5, "eval_inner_steps": 10},
            "backbone": {"_target_": "simt.models.Conv4", "hidden": 8},
            "dataset": {"_target_": f"simt.data.{dataset}.{dataset}"}, "simt": {"enabled": simt, "eta": 0.995},
            "trainer": {"steps": 4, "eval_tasks": 6, "episode_seed": episode_seed}, "seed": seed,
            "task": {"ways": 5, "shots": shots, "queries": 15}, **extra}


def write_run(root, scores, algo="maml", simt=False, seed=0, shots=1, dataset="synthetic", metric="acc",
              direction="maximize", history=None, episode_seed=0, **drop):
    """A finished run directory whose reported model scored `scores` on the test episodes."""
    run_dir = root / f"{dataset}-{algo}-{shots}shot-{'simt' if simt else 'base'}-s{seed}"
    run_dir.mkdir(parents=True)
    reported = "target" if simt else "student"
    mean, ci = mean_ci95(scores)
    results = {f"test/{metric}": mean, f"test/{metric}_ci95": ci, "reported_model": reported,
               "val/history": history or [{"step": 2, "student": 1.0, **({"target": 2.0} if simt else {}),
                                           "selects": True}],
               "objective_direction": direction, "config": config(algo, simt, seed, shots, dataset, episode_seed),
               "test_episodes": {"student": [s - 100 for s in scores], reported: list(scores)}}
    for key in drop:  # write_run(..., test_episodes=None) leaves "test_episodes" out
        results.pop(key)
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def write_failed_run(root, **identity):
    """A run that started (Hydra wrote its config) and died before results.json."""
    run_dir = root / f"failed-{'-'.join(map(str, identity.values()))}"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config(**identity)))
    (run_dir / "last.pt").write_bytes(b"")
    return run_dir


def ci(values) -> float:  # written out independently of simt.table: 1.96 * sample std / sqrt(n)
    mean = sum(values) / len(values)
    return 1.96 * math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) / math.sqrt(len(values))


def only_cell(*run_dirs, expected=()):
    (cell,) = aggregate(load_runs(run_dirs, expected))
    return cell


# -- labels -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["maml", "fomaml", "anil", "metasgd", "protonet"])
def test_labels_of_the_real_algo_configs(name):
    algo = OmegaConf.to_container(make_cfg(f"algo={name}").algo)
    assert algorithm_label(algo) == name
    assert {k: algo.get(k) for k in ALGO[name]} == ALGO[name]  # the hand-written configs above are faithful


def test_unknown_learner_is_a_one_line_error():
    with pytest.raises(TableError, match="algo._target_='my.Reptile': expected GradientLearner"):
        algorithm_label({"_target_": "my.Reptile"})


# -- statistics -------------------------------------------------------------------------------------

def test_numpy_ci_is_the_evaluator_formula():
    import simt.data  # noqa: F401  (simt.evaluator cannot be imported first: evaluator -> algorithms -> data cycle)
    from simt.evaluator import mean_ci95 as evaluator_mean_ci95
    values = list(np.random.default_rng(0).uniform(0, 100, size=37))
    assert mean_ci95(values) == pytest.approx(evaluator_mean_ci95(values), rel=1e-12)


def test_arm_mean_and_ci_average_seeds_per_episode_first(tmp_path):
    cell = only_cell(write_run(tmp_path, [1, 2, 3, 4, 9, 11], seed=0),
                     write_run(tmp_path, [3, 4, 5, 6, 7, 1], seed=1))
    seed_averaged = [2, 3, 4, 5, 8, 6]
    assert cell.baseline.mean == pytest.approx(sum(seed_averaged) / 6)
    assert cell.baseline.mean == pytest.approx((30 / 6 + 26 / 6) / 2)  # = mean over seeds of each run's mean
    assert cell.baseline.ci95 == pytest.approx(ci(seed_averaged))
    assert cell.baseline.seeds == [0, 1] and cell.simt.problem == "missing" and cell.gain is None


def test_one_seed_reproduces_the_runs_own_ci(tmp_path):
    run_dir = write_run(tmp_path, [20.0, 40.0, 33.3, 26.7, 46.7, 13.3])
    results = json.loads((run_dir / "results.json").read_text())
    cell = only_cell(run_dir)
    assert (cell.baseline.mean, cell.baseline.ci95) == pytest.approx((results["test/acc"], results["test/acc_ci95"]))


def test_paired_gain_and_ci_by_hand_and_much_tighter_than_unpaired(tmp_path):
    difficulty = [10.0, 50.0, 90.0, 30.0, 70.0, 20.0]  # shared by both arms: pairing cancels it
    lift = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0]
    cell = only_cell(write_run(tmp_path, difficulty),
                     write_run(tmp_path, [d + u for d, u in zip(difficulty, lift)], simt=True))
    assert cell.gain == pytest.approx(1.5)
    assert cell.gain_ci95 == pytest.approx(1.96 * math.sqrt(0.3) / math.sqrt(6))  # sd of 1,2,1,2,1,2 is √0.3
    unpaired = math.hypot(cell.baseline.ci95, cell.simt.ci95)
    assert cell.gain_ci95 < unpaired / 20
    assert cell.significant and cell.per_seed_gains == pytest.approx([1.5])


def test_multi_seed_gain_differences_seed_averaged_scores(tmp_path):
    base = {0: [10.0, 20.0, 30.0, 40.0, 50.0, 60.0], 1: [12.0, 18.0, 30.0, 44.0, 50.0, 58.0]}
    simt = {0: [11.0, 23.0, 30.0, 41.0, 52.0, 61.0], 1: [15.0, 18.0, 31.0, 44.0, 53.0, 61.0]}
    runs = [write_run(tmp_path, base[s], seed=s) for s in base] + [write_run(tmp_path, simt[s], simt=True, seed=s)
                                                                    for s in simt]
    cell = only_cell(*runs)
    # episode i: (simt0 + simt1)/2 - (base0 + base1)/2
    differences = [(11 + 15) / 2 - (10 + 12) / 2, (23 + 18) / 2 - (20 + 18) / 2, (30 + 31) / 2 - (30 + 30) / 2,
                   (41 + 44) / 2 - (40 + 44) / 2, (52 + 53) / 2 - (50 + 50) / 2, (61 + 61) / 2 - (60 + 58) / 2]
    assert differences == [2.0, 1.5, 0.5, 0.5, 2.5, 2.0]
    assert cell.gain == pytest.approx(1.5) and cell.gain_ci95 == pytest.approx(ci(differences))
    assert cell.per_seed_gains == pytest.approx([8 / 6, 10 / 6])  # seed 0: 1,3,0,1,2,1; seed 1: 3,0,1,0,3,3
    pooled = [s - b for seed in (0, 1) for s, b in zip(simt[seed], base[seed])]  # seeds x episodes as independent
    assert cell.gain_ci95 == pytest.approx(0.66947, abs=1e-5) and ci(pooled) == pytest.approx(0.70339, abs=1e-5)


def test_gain_uses_only_seeds_finished_in_both_arms(tmp_path):
    runs = [write_run(tmp_path, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], seed=0),
            write_run(tmp_path, [9.0, 9.0, 9.0, 9.0, 9.0, 8.0], seed=1),
            write_run(tmp_path, [2.0, 2.0, 4.0, 4.0, 6.0, 6.0], simt=True, seed=0)]
    cell = only_cell(*runs)
    assert cell.paired_seeds == [0] and cell.gain == pytest.approx(0.5)
    out = write_outputs([cell], load_runs(runs), tmp_path / "out", PROTOCOL)
    assert "(seeds 0)" in out  # the gain is over fewer seeds than the baseline mean: said in the table


def test_runs_on_different_test_episodes_are_not_compared(tmp_path):
    runs = [write_run(tmp_path, [1.0] * 6), write_run(tmp_path, [2.0] * 6, simt=True, episode_seed=1)]
    with pytest.raises(TableError, match="different test episodes.*episode_seed=1"):
        aggregate(load_runs(runs))


# -- failed and missing runs ------------------------------------------------------------------------

def read_csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_failed_and_missing_runs_are_shown_not_dropped(tmp_path):
    scores = [20.0, 40.0, 30.0, 30.0, 50.0, 10.0]
    runs = load_runs([write_run(tmp_path, scores, seed=0), write_run(tmp_path, scores, seed=1),
                      write_run(tmp_path, scores, simt=True, seed=0),
                      write_failed_run(tmp_path, simt=True, seed=1),                # maml: SiMT half failed
                      write_run(tmp_path, scores, algo="anil"),
                      write_failed_run(tmp_path, algo="anil", simt=True)],        # anil: SiMT all failed
                     expected=[RunKey("synthetic", "conv4", "metasgd", 1, simt, 0) for simt in (False, True)])
    table = write_outputs(aggregate(runs), runs, tmp_path / "out", PROTOCOL)
    rows = {cells[0]: cells for cells in (line.strip("| ").split(" | ") for line in table.splitlines()
                                          if line.startswith("| "))}
    assert rows["maml"][3].endswith("(failed (1/2))") and rows["anil"][3] == "failed (1/1)"
    assert rows["metasgd"][2:6] == ["missing", "missing", "missing", "n/a (no seed finished in both arms)"]
    cells = {row["algorithm"]: row for row in read_csv(tmp_path / "out" / "table.csv")}
    assert (cells["maml"]["simt_problem"], cells["maml"]["simt_seeds"]) == ("failed (1/2)", "0")
    assert cells["anil"]["simt_problem"] == "failed (1/1)" and cells["metasgd"]["baseline_problem"] == "missing"
    statuses = sorted((r["cell"].split("/")[2], r["simt"], r["seed"], r["status"])
                      for r in read_csv(tmp_path / "out" / "runs.csv"))
    assert statuses == [("anil", "False", "0", "done"), ("anil", "True", "0", "failed"),
                        ("maml", "False", "0", "done"), ("maml", "False", "1", "done"), ("maml", "True", "0", "done"),
                        ("maml", "True", "1", "failed"), ("metasgd", "False", "0", "missing"),
                        ("metasgd", "True", "0", "missing")]


def test_a_rerun_counts_once_as_done(tmp_path):
    failed = write_failed_run(tmp_path, simt=True)
    done = write_run(tmp_path, [1.0] * 6, simt=True)
    (run,) = load_runs([failed, done])
    assert (run.status, run.run_dir) == ("done", done)


def test_bad_results_json_names_the_file_and_key(tmp_path):
    run_dir = write_run(tmp_path, [1.0] * 6, test_episodes=None)
    with pytest.raises(TableError, match=f"{run_dir / 'results.json'}: missing key 'test_episodes'"):
        load_runs([run_dir])
    with pytest.raises(TableError, match="expected results.json or .hydra/config.yaml"):
        load_runs([tmp_path / "never-started"])


# -- outputs ----------------------------------------------------------------------------------------

def test_regression_cell_states_that_lower_is_better(tmp_path):
    errors = [3.0, 5.0, 4.0, 6.0, 2.0, 4.0]
    runs = load_runs([write_run(tmp_path, errors, metric="mse", direction="minimize", dataset="pascal1d"),
                      write_run(tmp_path, [e - 1 for e in errors], simt=True, metric="mse", direction="minimize",
                                dataset="pascal1d")])
    (cell,) = aggregate(runs)
    table = write_outputs([cell], runs, tmp_path / "out", PROTOCOL)
    assert cell.lower_is_better and cell.gain == pytest.approx(-1.0)
    assert "| maml | mse ↓ (lower is better) |" in table and "-1.00 [-1.00, -1.00]" in table
    assert read_csv(tmp_path / "out" / "table.csv")[0]["direction"] == "minimize"


def test_all_outputs_are_written_and_pngs_are_valid(tmp_path):
    history = [{"step": 2, "student": 30.0, "target": 31.0, "selects": True},
               {"step": 4, "student": 35.0, "target": 37.0, "selects": True}]
    run_dirs = [write_run(tmp_path, [30.0 + i for i in range(6)], algo=algo, simt=simt, shots=shots, dataset=ds,
                          history=history)
                for algo in ("maml", "protonet") for simt in (False, True) for shots in (1, 5)
                for ds in ("synthetic", "kanji")]
    runs = load_runs(run_dirs)
    table = write_outputs(aggregate(runs), runs, tmp_path / "out", {"BN mode": "transductive", "seeds": "0"})
    assert (tmp_path / "out" / "table.md").read_text() == table
    assert "| data set / backbone | algorithm |" in table and "| kanji/conv4 | protonet |" in table  # several settings
    assert "5-shot gain [paired 95% CI]" in table and "- BN mode: transductive" in table
    assert "- test episodes (from the run configs): 6" in table and "momentum network (target)" in table
    assert len(read_csv(tmp_path / "out" / "table.csv")) == 8 and len(read_csv(tmp_path / "out" / "runs.csv")) == 16
    for name in ("gains.png", "curves.png"):
        png = (tmp_path / "out" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


# -- published numbers ------------------------------------------------------------------------------

def test_published_column_shows_entries_and_dashes(tmp_path):
    source = "Test et al. 2099, Table 9, row MAML, column synthetic 1-shot"
    (tmp_path / "published.yaml").write_text(yaml.safe_dump({"entries": [
        {"dataset": "synthetic", "backbone": "conv4", "algorithm": "maml", "shots": 1, "simt": s, "value": v,
         "source": source, **({"ci95": 0.8} if s else {})} for s, v in ((False, 41.2), (True, 43.5))]}))
    published = load_published(tmp_path / "published.yaml")
    runs = load_runs([write_run(tmp_path, [1.0, 2.0] * 3), write_run(tmp_path, [1.0, 2.0] * 3, algo="anil")])
    table = write_outputs(aggregate(runs), runs, tmp_path / "out", PROTOCOL, published)
    rows = [line for line in table.splitlines() if line.startswith("| maml") or line.startswith("| anil")]
    assert rows[0].endswith("| 41.20 → 43.50 ± 0.80 |") and rows[1].endswith("| — |")
    assert f"- {source}" in table
    assert read_csv(tmp_path / "out" / "table.csv")[0]["published_simt"] == "43.5"


def test_published_file_errors_and_the_shipped_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("entries:\n- {dataset: x, backbone: conv4, algorithm: maml, shots: 1, "
                                       "simt: true}\n")
    with pytest.raises(TableError, match="bad.yaml: entry 0 lacks value, source"):
        load_published(tmp_path / "bad.yaml")
    assert all(p.source for p in load_published(ROOT / "sweeps" / "published.yaml").values())


def test_simt_rows_show_the_targets_student_too(tmp_path):
    scores = [60.0, 80.0, 70.0, 90.0]
    runs = load_runs([write_run(tmp_path, scores), write_run(tmp_path, scores, simt=True)])
    cell = aggregate(runs)[0]
    assert cell.simt.mean == pytest.approx(75.0) and cell.simt.student_mean == pytest.approx(-25.0)  # scores - 100
    table = write_outputs([cell], runs, tmp_path / "out", PROTOCOL)
    header, row = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith("| ")][:2]
    assert header[3:5] == ["1-shot SiMT", "1-shot SiMT's student"] and row[4].startswith("-25.00 ± ")
    assert float(read_csv(tmp_path / "out" / "table.csv")[0]["simt_student_mean"]) == pytest.approx(-25.0)
