"""`make reproduce-table`: presets, the plan, a tiny grid end to end, skipping finished runs on a re-run,
and the paper preset's plan on fixture data."""
import shutil
import signal
import subprocess
import sys
import time

import pytest

import fixtures_images
from conftest import ROOT, child_env
from simt import reproduce


def reproduce_cli(*args: str, timeout: float = 900, **popen):
    env = child_env()
    return subprocess.run([sys.executable, "-m", "simt.reproduce", *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True, **popen)


def test_every_preset_composes_for_every_data_set():
    for path in sorted(reproduce.PRESETS.glob("*.yaml")):
        preset, _, _ = reproduce.load_preset(path.stem, None)
        for dataset in preset["datasets"]:
            _, _, entry = reproduce.load_preset(path.stem, dataset)
            axes = reproduce.grid_axes(preset, entry)
            assert axes["simt.enabled"] == ["false", "true"] and axes["seed"]
            grid = reproduce.cells(axes)
            assert len(grid) == len({tuple(c) for c in grid}) == len(preset["seeds"]) * 2 * len(next(iter(axes.values())))
            reproduce.compose_runs(grid[:1], reproduce.shared_overrides(preset, entry, "/data", []))


def test_bad_preset_or_data_set_is_one_line():
    bad = reproduce_cli("--preset", "huge")
    assert bad.returncode == 2 and bad.stderr.startswith("error: PRESET='huge': no file")
    bad = reproduce_cli("--preset", "paper", "--dataset", "imagenet")
    assert bad.returncode == 2 and "DATASET='imagenet'" in bad.stderr and "miniimagenet" in bad.stderr


@pytest.mark.parametrize("override,message", [
    ("trainer.eval_tasks=abc", "error: trainer.eval_tasks='abc': expected an integer in 2..1,000,000 (a million "
                                "episodes take hours on a GPU)"),  # val_tasks follows it
    ("trainer.nosuch=1", "error: Could not override 'trainer.nosuch'."),
])
def test_bad_override_is_one_line_before_anything_runs(override, message, capsys):
    assert reproduce.main(["--plan-only", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


@pytest.fixture(scope="module")
def smoke_grid(tmp_path_factory):
    """`make reproduce-table PRESET=smoke` run once for this module (8 tiny runs, about half a minute): its
    output folder and the command's result. Tests that change the folder work on a copy."""
    out = tmp_path_factory.mktemp("smoke")
    return out, reproduce_cli("--preset", "smoke", "--out", str(out))


def test_tiny_grid_writes_every_output_then_skips_finished_runs(smoke_grid):
    tmp_path, first = smoke_grid
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "8 runs" in first.stdout and "0 already finished, 8 to run" in first.stdout
    for name in ("table.md", "table.csv", "runs.csv", "gains.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = (tmp_path / "table.md").read_text()
    assert table in first.stdout
    rows = [line for line in table.splitlines() if line.startswith(("| maml |", "| anil |"))]
    assert len(rows) == 2 and all("±" in row and "missing" not in row and "failed" not in row for row in rows), table
    results = sorted((tmp_path / "runs").glob("*/results.json"))
    assert len(results) == 8
    written = {p: p.stat().st_mtime_ns for p in results}

    second = reproduce_cli("--preset", "smoke", "--out", str(tmp_path))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "8 already finished, 0 to run" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in results} == written  # nothing was retrained or rewritten
    assert (tmp_path / "table.md").read_text() == table


def test_a_failed_run_shows_as_failed(smoke_grid, tmp_path):
    # A run whose results.json is gone and whose checkpoint is corrupt fails on the re-run; the table says so.
    finished, first = smoke_grid
    assert first.returncode == 0
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    (broken,) = (tmp_path / "runs").glob("algo=anil,seed=0,simt.enabled=[Tt]rue")
    (broken / "results.json").unlink()
    (broken / "last.pt").write_bytes(b"not a checkpoint")
    again = reproduce_cli("--preset", "smoke", "--out", str(tmp_path))
    assert again.returncode == 0
    assert "7 already finished, 1 to run" in again.stdout and "some runs failed" in again.stdout
    assert "failed (1/2)" in (tmp_path / "table.md").read_text()


@pytest.mark.slow
def test_paper_preset_prints_its_plan_and_starts_on_fixtures(tmp_path):
    data = tmp_path / "data"
    fixtures_images.write_all(data, classes_per_split={"train": 20, "val": 5, "test": 5})
    env = child_env()
    proc = subprocess.Popen([sys.executable, "-m", "simt.reproduce", "--preset", "paper", "--dataset", "miniimagenet",
                             "--data-dir", str(data), "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not list((tmp_path / "out" / "runs").glob("*/run.log")) and time.time() < deadline and proc.poll() is None:
        time.sleep(1)
    started = list((tmp_path / "out" / "runs").glob("*/run.log"))
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert "48 runs (8 experiment x 2 simt.enabled x 3 seed)" in output, output
    assert "estimate:" in output and " h on this machine" in output
    assert started, output
