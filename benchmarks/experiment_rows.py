"""Every paper row's acceptance command in one process, timed: for each file in conf/experiment/,

    python run.py experiment=<row> data_dir=<fixtures> trainer.steps=3 trainer.eval_tasks=4 [simt.enabled=false]

with SiMT and without (the row's baseline), on fixture files in every data format, written by the test
helpers (tests/fixtures_*.py). One process instead of one per row saves Python and CUDA start-up.
The command validates on 4 episodes (trainer.val_tasks follows a smaller trainer.eval_tasks; until
2026-11-26 it stayed at trainer=paper's 500). On a 2-core CPU (2 threads) a Conv4 84x84 row takes about
a minute (3 second-order meta-steps of 13 s, 16 evaluation episodes); a ResNet-12 row is GPU work. On an
H100 run it alone on the card: three processes sharing an 80 GB card ran out of its memory.

    python -m benchmarks.experiment_rows --out rows.md                 # every row, ResNet-12 rows first
    python -m benchmarks.experiment_rows --only conv4 --simt on trainer.val_tasks=2   # a subset, extra overrides

Rows start until --budget seconds have passed; the table (written after every row) says which ran.
Exit status 1 when a row failed.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from simt import pipeline
from tests import fixtures_images, fixtures_regression
from tests.conftest import ROOT, make_cfg

ACCEPTANCE = ("trainer.steps=3", "trainer.eval_tasks=4")


def rows(only: str | None, exclude: str | None, simt: str, shard: tuple[int, int] = (0, 1)) -> list[tuple[str, bool]]:
    """(experiment, SiMT on) pairs, the ones that need a GPU (ResNet-12) first; every n-th from the k-th
    for shard (k, n), so that n processes can share one GPU."""
    names = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    names = sorted((n for n in names if (only is None or only in n) and (exclude is None or exclude not in n)),
                   key=lambda n: "resnet12" not in n)
    variants = {"both": (True, False), "on": (True,), "off": (False,)}[simt]
    return [(name, enabled) for name in names for enabled in variants][shard[0]::shard[1]]


def shard_arg(text: str) -> tuple[int, int]:
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
        raise argparse.ArgumentTypeError(f"expected k/n with 0 <= k < n, got {text!r}")
    return int(k), int(n)


def write_fixtures(root: Path) -> Path:
    # ProtoNet trains 20-way, so the train split needs 20 classes; regression rows need 20 samples.
    fixtures_images.write_all(root, classes_per_split={"train": 20, "val": 5, "test": 5})
    fixtures_regression.write_shapenet1d(root, samples=20)
    fixtures_regression.write_pascal1d(root, samples=20)
    return root


def table(results: list[dict], left: list[str], why: str) -> str:
    lines = ["| experiment | SiMT | device | seconds | objective | result |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['experiment']} | {r['simt']} | {r['device']} | {r['seconds']:.1f} | {r['objective']} | "
              f"{r['result']} |" for r in results]
    passed = sum(r["result"] == "ok" for r in results)
    summary = f"{passed} of {len(results)} rows ran and gave a finite objective"
    if left:
        summary += f"; {len(left)} {why}: {', '.join(left)}"
    return "\n".join(lines) + f"\n\n{summary}.\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="extra overrides for every row (after the acceptance ones)")
    parser.add_argument("--only", help="rows whose name contains this")
    parser.add_argument("--exclude", help="rows whose name does not contain this")
    parser.add_argument("--simt", choices=("both", "on", "off"), default="both",
                        help="each row with SiMT and without (both), or one of them")
    parser.add_argument("--shard", type=shard_arg, default=(0, 1), help="k/n: every n-th run from the k-th")
    parser.add_argument("--budget", type=float, default=math.inf, help="seconds after which no row starts")
    parser.add_argument("--out", type=Path, help="markdown table written here after every row")
    args = parser.parse_args(argv)
    runs = rows(args.only, args.exclude, args.simt, args.shard)
    if not runs:
        parser.error(f"--only {args.only!r} / --exclude {args.exclude!r} leave no file of conf/experiment/")
    names = [f"{name}{'' if enabled else ' (baseline)'}" for name, enabled in runs]
    started, results = time.perf_counter(), []
    header = (f"# Experiment rows, acceptance command ({' '.join(ACCEPTANCE)} {' '.join(args.overrides)}), "
              f"torch {torch.__version__}, "
              f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}, "
              f"{os.cpu_count()} CPU cores\n\n")
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = write_fixtures(Path(scratch) / "data")
        for index, (name, enabled) in enumerate(runs):
            if time.perf_counter() - started > args.budget:
                left = names[index:]
                break
            cfg = make_cfg(f"experiment={name}", f"data_dir={data_dir}", *ACCEPTANCE,
                           *([] if enabled else ["simt.enabled=false"]), *args.overrides)
            row = {"experiment": name, "simt": "yes" if cfg.simt.enabled else "no",
                   "device": str(pipeline.pick_device(cfg.trainer.device)), "objective": "n/a"}
            began = time.perf_counter()
            try:
                run_dir = Path(scratch) / "runs" / f"{name}-{row['simt']}"
                objective = pipeline.run(cfg, run_dir)
                saved = json.loads((run_dir / "results.json").read_text())["objective"]
                row["objective"] = f"{objective:.4g}"
                row["result"] = "ok" if math.isfinite(objective) and objective == saved else "NO: objective not finite"
            except Exception as error:  # noqa: BLE001 - a failing row is reported, the others still run
                traceback.print_exc()
                row["result"] = f"FAILED: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            row["seconds"] = time.perf_counter() - began
            results.append(row)
            print(f"{names[index]}: {row['result']} in {row['seconds']:.1f} s", file=sys.stderr, flush=True)
            if args.out:
                args.out.write_text(header + table(results, names[index + 1:], "still to run"))
        else:
            left = []
    text = header + table(results, left, "not started (--budget spent)")
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0 if all(r["result"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
