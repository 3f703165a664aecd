"""`make reproduce-table`: train the baseline-vs-SiMT grid of a preset, then print the table.

    python -m simt.reproduce                                   # PRESET=cpu: embedded kanji, this CPU
    python -m simt.reproduce --preset paper --dataset miniimagenet --data-dir /data

A preset (sweeps/table/<name>.yaml) names the grid per data set, the seeds and the overrides every run
shares. The grid runs as one Hydra multirun (`run.py -m`, the joblib launcher when jobs > 1) into
results/<preset>-<dataset>/runs/<grid values>/ (Hydra's override_dirname), with trainer.resume=true: a run whose results.json was
written by the same config (pipeline.config_hash) returns at once, an interrupted one resumes from its
last.pt. Then simt.table aggregates every run of the grid, failed ones included.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from simt import table

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "sweeps" / "table"


class PresetError(ValueError):
    """A bad preset or command-line choice; one line naming the file or key."""


def load_preset(name: str, dataset: str | None) -> tuple[dict, str, dict]:
    """(preset, data set name, that data set's grid entry)."""
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise PresetError(f"PRESET={name!r}: no file {path} (presets: {names})")
    preset = yaml.safe_load(path.read_text())
    dataset = dataset or preset["default_dataset"]
    if dataset not in preset["datasets"]:
        raise PresetError(f"DATASET={dataset!r}: preset {name} has {', '.join(preset['datasets'])} ({path})")
    return preset, dataset, preset["datasets"][dataset]


def _value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def grid_axes(preset: dict, entry: dict) -> dict[str, list[str]]:
    """Every axis of the grid, key -> values: the data set's own, then SiMT off/on and the seeds."""
    axes = {key: [_value(v) for v in values] for key, values in entry["grid"].items()}
    return {**axes, "simt.enabled": ["false", "true"], "seed": [_value(s) for s in preset["seeds"]]}


def cells(axes: dict[str, list[str]]) -> list[list[str]]:
    """The grid's runs, each as its list of overrides."""
    return [[f"{k}={v}" for k, v in zip(axes, values)] for values in itertools.product(*axes.values())]


def shared_overrides(preset: dict, entry: dict, data_dir: str | None, extra: list[str]) -> list[str]:
    return [*preset.get("overrides", []), *entry.get("overrides", []),
            *([f"data_dir={data_dir}"] if data_dir else []), *extra]


# -- planning ---------------------------------------------------------------------------------------

def compose_runs(grid: list[list[str]], shared: list[str]) -> list[dict]:
    """The resolved config of every run, composed and checked as run.py would (no training)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from simt.pipeline import check_config

    def checked(overrides: list[str]):
        cfg = compose("config", overrides=overrides)
        check_config(cfg)  # before resolving: a bad value gets its one-line error, not a resolver's traceback
        return cfg

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return [OmegaConf.to_container(checked([*shared, *cell]), resolve=True) for cell in grid]


def finished_hashes(runs_dir: Path) -> set[str]:
    hashes = set()
    for path in runs_dir.glob("*/results.json"):
        try:
            hashes.add(json.loads(path.read_text()).get("config_hash"))
        except json.JSONDecodeError:
            continue  # a half-written file is not a finished run (results.json is written atomically)
    return hashes


def calibrate(config: dict) -> tuple[float, float]:
    """Seconds per meta-step and per evaluation episode on this machine, measured on the first run's
    config (2 timed steps after a warm-up), for the plan's time estimate."""
    import torch
    from omegaconf import OmegaConf

    from simt import pipeline
    from simt.evaluator import evaluate
    from simt.trainer import meta_batch_backward

    cfg = OmegaConf.create(config)
    exp = pipeline.build(cfg)
    optimizer = torch.optim.Adam(exp.learner.meta_parameters().values(), lr=cfg.trainer.lr)
    sampler = exp.dataset.split("train").sampler(pipeline.train_ways(cfg), cfg.task.shots, cfg.task.queries, seed=0)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        tasks = [sampler.sample().to(exp.device) for _ in range(cfg.task.meta_batch_size)]
        optimizer.zero_grad()
        meta_batch_backward(exp.learner, exp.target, tasks, exp.dataset.metric)
        optimizer.step()
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    evaluate(exp.learner, pipeline._models(exp), pipeline._episodes(cfg, exp, "val", 2), exp.device,
             exp.dataset.metric, total=2, desc="calibrate", progress=False)
    return sum(times[1:]) / 2, (time.perf_counter() - started) / 2


def estimate_hours(config: dict, step_s: float, episode_s: float) -> float:
    t = config["trainer"]
    validations = t["steps"] // t["eval_every"] + 1
    return (t["steps"] * step_s + (validations * t["val_tasks"] + t["eval_tasks"]) * episode_s) / 3600


# -- running ----------------------------------------------------------------------------------------

def multirun_command(axes: dict[str, list[str]], shared: list[str], runs_dir: Path, jobs: int) -> list[str]:
    fixed = [*shared, "trainer.resume=true", "trainer.progress=false"]
    excluded = sorted({o.split("=", 1)[0].lstrip("+~") for o in fixed})
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"] if jobs > 1 else []
    return [sys.executable, str(ROOT / "run.py"), "-m", *(f"{k}={','.join(v)}" for k, v in axes.items()), *fixed,
            *launcher, f"hydra.sweep.dir={runs_dir}", "hydra.sweep.subdir=${hydra.job.override_dirname}",
            f"hydra.job.config.override_dirname.exclude_keys=[{','.join(excluded)}]"]


def watch(runs_dir: Path, total: int, done_before: int, stop: threading.Event, every: float = 60) -> None:
    """Print which runs are going, how many are done, and an ETA, until `stop` is set."""
    started = time.time()
    while not stop.wait(every):
        dirs = [d for d in runs_dir.iterdir() if (d / "run.log").is_file()] if runs_dir.is_dir() else []
        done = sum((d / "results.json").is_file() for d in dirs)
        running = [d.name for d in dirs if not (d / "results.json").is_file()]
        new = done - done_before
        eta = f"{(time.time() - started) / new * (total - done) / 60:.0f} min" if new > 0 else "unknown yet"
        print(f"[{time.strftime('%H:%M:%S')}] {done}/{total} runs done; running: {'; '.join(running) or '-'};"
              f" about {eta} left", flush=True)


def grid_runs(runs_dir: Path, expected: list) -> list:
    """The grid's runs found under runs_dir (finished or failed), plus a `missing` run for every other cell.
    Directories of other grids (an earlier preset with other seeds, say) are left out."""
    wanted = set(expected)
    dirs = [d for d in sorted(runs_dir.glob("*")) if (d / ".hydra" / "config.yaml").is_file()]
    return table.load_runs([d for d in dirs if table.load_run(d).key in wanted], expected)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None, help="results folder (default results/<preset>-<dataset>)")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and stop")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    try:
        preset, dataset, entry = load_preset(args.preset, args.dataset)
    except PresetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out or ROOT / "results" / f"{args.preset}-{dataset}").resolve()
    runs_dir = out / "runs"
    axes, shared = grid_axes(preset, entry), shared_overrides(preset, entry, args.data_dir, args.overrides)
    grid = cells(axes)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from simt.pipeline import ConfigError, config_hashes
    try:
        configs = compose_runs(grid, shared)
    except (HydraException, OmegaConfBaseException, ConfigError) as error:  # a bad override or value
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    done = finished_hashes(runs_dir)
    pending = [(cell, cfg) for cell, cfg in zip(grid, configs) if not config_hashes(cfg) & done]
    jobs = int(preset.get("jobs", 1))
    print(f"{args.preset} preset on {dataset}: {len(grid)} runs ({' x '.join(f'{len(v)} {k}' for k, v in axes.items())}),"
          f" {len(grid) - len(pending)} already finished, {len(pending)} to run, {jobs} at a time; results in {out}")
    if pending:
        step_s, episode_s = calibrate(pending[0][1])
        hours = sum(estimate_hours(cfg, step_s, episode_s) for _, cfg in pending) / jobs
        print(f"estimate: {hours:.1f} h on this machine ({step_s:.2f} s per meta-step and {episode_s:.2f} s per "
              f"evaluation episode measured on {' '.join(pending[0][0])}; runs differ, so this is rough)", flush=True)
    if args.plan_only:
        return 0
    if pending:
        log = out / "multirun.log"
        out.mkdir(parents=True, exist_ok=True)
        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(runs_dir, len(grid), len(grid) - len(pending), stop), daemon=True)
        watcher.start()
        with open(log, "a") as handle:
            status = subprocess.run(multirun_command(axes, shared, runs_dir, jobs), cwd=ROOT, stdout=handle,
                                    stderr=subprocess.STDOUT).returncode
        stop.set()
        if status:
            print(f"some runs failed (exit status {status}); they show as failed below. Log: {log}")
    runs = grid_runs(runs_dir, [table.run_key(cfg) for cfg in configs])
    protocol = {"preset": f"{args.preset} (sweeps/table/{args.preset}.yaml)", **preset.get("protocol", {})}
    published = table.load_published(ROOT / "sweeps" / "published.yaml")
    print(table.write_outputs(table.aggregate(runs), runs, out, protocol, published))
    print(f"written: {out}/table.md, table.csv, runs.csv, gains.png, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
