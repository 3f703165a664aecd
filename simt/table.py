"""The baseline-vs-SiMT table behind `make reproduce-table`: finished run directories in, table and plots out.

A cell is (data set, backbone, algorithm, shots) with two arms over the grid's seeds: the baseline
(simt.enabled=false, scored with its student) and SiMT (scored with its momentum target, as the official
code reports it). Every run is scored on the same fixed test episodes (trainer.episode_seed), so scores can
be compared episode by episode.

Statistics. Within an arm, each test episode's score is first averaged over the arm's finished seeds; the
arm's mean is the mean of these seed-averaged scores (equal to the mean over seeds of each run's test mean)
and its 95% CI is 1.96·s/√n over the n episodes, s with n-1 (the formula of simt.evaluator.mean_ci95, so
one seed gives exactly the run's own `test/<metric>_ci95`). The gain is paired the same way: over the seeds
finished in both arms, d_i = (SiMT score of episode i, averaged over those seeds) - (baseline score,
likewise); gain = mean(d), CI = 1.96·sd(d)/√n. Averaging over seeds before differencing keeps one
difference per episode instead of treating seeds x episodes as independent samples (seeds share the
episodes, so they are not). The interval therefore covers test-episode noise given the trained models, not
seed-to-seed training variation: with the one to three seeds a grid affords, a between-seed variance is
too poorly estimated to fold in, so the per-seed gains go to table.csv for the reader to judge. A gain is
significant when its interval excludes 0. Gains are always SiMT - baseline: for metrics where lower is
better (MSE, angular error) an improvement is a negative gain, and the table says so.
"""
import csv
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

ALGORITHMS = ("maml", "fomaml", "anil", "metasgd", "protonet")  # row order of the table
REQUIRED_RESULT_KEYS = ("config", "reported_model", "objective_direction", "test_episodes", "val/history")
REPORTED_MODELS = {"target": "the momentum network (target) after test-time adaptation, as the official code "
                             "evaluates SiMT", "student": "the meta-learned network (student)"}


class TableError(ValueError):
    """Input the table cannot use; the message is one line naming the file (or cell) and what was expected."""


def mean_ci95(values) -> tuple[float, float]:
    """simt.evaluator.mean_ci95 (1.96·s/√n, s with n-1) in numpy: that module imports torch, which a table
    of finished runs does not need. tests/test_table.py checks that the two agree."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))


# -- run identity and loading -----------------------------------------------------------------------

@dataclass(frozen=True)
class RunKey:
    """What a run is in the grid: its cell (dataset, backbone, algorithm, shots), arm (simt) and seed."""

    dataset: str      # data set label; "<train>_to_<test>" for a cross-domain meta-test (eval_dataset)
    backbone: str
    algorithm: str    # one of ALGORITHMS
    shots: int
    simt: bool
    seed: int

    @property
    def cell(self) -> tuple[str, str, str, int]:
        return self.dataset, self.backbone, self.algorithm, self.shots


def algorithm_label(algo: dict) -> str:
    """The paper's name for an `algo` config: the learner class, then MAML's variants by their switches."""
    learner = algo["_target_"].rsplit(".", 1)[-1]
    if learner in ("ProtoNet", "MetaSGD"):
        return learner.lower()
    if learner != "GradientLearner":
        raise TableError(f"algo._target_={algo['_target_']!r}: expected GradientLearner, MetaSGD or ProtoNet")
    if algo.get("adapt_scope") == "head":
        return "anil"
    return "fomaml" if algo.get("first_order") else "maml"


def _label(node: dict) -> str:
    # Image and regression sets carry a name; embedded ones are named by their builder (kanji_dataset).
    return str(node.get("name") or node["_target_"].rsplit(".", 1)[-1].removesuffix("_dataset")).lower()


def run_key(config: dict) -> RunKey:
    """The RunKey of a run config (results.json's "config" or .hydra/config.yaml)."""
    dataset = _label(config["dataset"])
    if config.get("eval_dataset"):  # cross-domain meta-test
        dataset += f"_to_{_label(config['eval_dataset'])}"
    return RunKey(dataset, _label(config["backbone"]), algorithm_label(config["algo"]), int(config["task"]["shots"]),
                  bool(config["simt"]["enabled"]), int(config["seed"]))


@dataclass
class Run:
    key: RunKey
    status: str                   # done | failed | missing
    run_dir: Path | None = None
    results: dict | None = None   # results.json, when done
    config: dict | None = None    # the run's config, when it started

    @property
    def scores(self) -> list[float]:
        """Per-episode test scores of the reported model (target for SiMT, student for the baseline)."""
        return self.results["test_episodes"][self.results["reported_model"]]

    @property
    def student_scores(self) -> list[float]:
        """Per-episode test scores of the meta-learned network itself (for SiMT: the target's student)."""
        return self.results["test_episodes"]["student"]

    @property
    def metric(self) -> str:
        return _metric_names(self.results)[0]


def _metric_names(results: dict) -> list[str]:
    return [k[5:] for k in results if k.startswith("test/") and "/" not in k[5:] and not k.endswith("_ci95")]


def _read_results(path: Path) -> dict:
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TableError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    lacking = [key for key in REQUIRED_RESULT_KEYS if key not in results]
    if lacking:
        raise TableError(f"{path}: missing key {lacking[0]!r} (expected a results.json written by run.py)")
    if len(_metric_names(results)) != 1:
        raise TableError(f"{path}: expected exactly one 'test/<metric>' key such as test/acc")
    if results["reported_model"] not in results["test_episodes"]:
        raise TableError(f"{path}: test_episodes has no scores for reported_model {results['reported_model']!r}")
    return results


def load_run(run_dir: Path | str) -> Run:
    """A directory with results.json is a finished run; one with only .hydra/config.yaml started and failed."""
    run_dir = Path(run_dir)
    results_path, config_path = run_dir / "results.json", run_dir / ".hydra" / "config.yaml"
    if results_path.is_file():
        path, results = results_path, _read_results(results_path)
        config, status = results["config"], "done"
    elif config_path.is_file():
        path, results, config, status = config_path, None, yaml.safe_load(config_path.read_text()), "failed"
    else:
        raise TableError(f"{run_dir}: expected results.json or .hydra/config.yaml (pass a run that never "
                         f"started as load_runs(expected=...))")
    try:
        return Run(run_key(config), status, run_dir, results, config)
    except (KeyError, TypeError, AttributeError) as error:
        raise TableError(f"{path}: config lacks {error} (expected a complete run config)") from None


def load_runs(run_dirs: Iterable[Path | str], expected: Iterable[RunKey] = ()) -> list[Run]:
    """Every run directory, plus a "missing" Run for each key in `expected` that no directory holds.
    A key that failed in one directory and finished in another (a rerun) counts once, as done."""
    by_key: dict[RunKey, list[Run]] = defaultdict(list)
    for run in map(load_run, run_dirs):
        by_key[run.key].append(run)
    for key in expected:
        by_key[key] = by_key.get(key) or [Run(key, "missing")]
    for key, runs in by_key.items():
        if sum(run.status == "done" for run in runs) > 1:
            raise TableError(f"{', '.join(str(r.run_dir) for r in runs)}: the same run ({key}) finished more than "
                             f"once; expected one directory per seed")
    return [min(runs, key=lambda run: run.status != "done") for runs in by_key.values()]


# -- aggregation ------------------------------------------------------------------------------------

@dataclass
class Arm:
    """One side of a cell (baseline or SiMT): its runs, and mean ± CI over its finished seeds."""

    runs: list[Run]
    mean: float | None = None
    ci95: float | None = None
    student_mean: float | None = None  # the student's score (the reported model of a baseline; SiMT's other one)
    student_ci95: float | None = None

    @property
    def done(self) -> list[Run]:
        return [run for run in self.runs if run.status == "done"]

    @property
    def seeds(self) -> list[int]:
        return sorted(run.key.seed for run in self.done)

    @property
    def problem(self) -> str:
        """"" when every run finished; else "failed (k/n)" and/or "missing (k/n)"; "missing" when none ran."""
        n = len(self.runs)
        counts = {status: sum(run.status == status for run in self.runs) for status in ("failed", "missing")}
        if counts["missing"] == n:  # n == 0 too: the grid has no run for this arm
            return "missing"
        return ", ".join(f"{status} ({k}/{n})" for status, k in counts.items() if k)


@dataclass
class Cell:
    dataset: str
    backbone: str
    algorithm: str
    shots: int
    baseline: Arm
    simt: Arm
    metric: str = ""
    lower_is_better: bool = False
    gain: float | None = None       # SiMT - baseline, paired over episodes of seed-averaged scores
    gain_ci95: float | None = None
    paired_seeds: list[int] = field(default_factory=list)
    per_seed_gains: list[float] = field(default_factory=list)

    @property
    def setting(self) -> str:
        return f"{self.dataset}/{self.backbone}"

    @property
    def significant(self) -> bool:
        return self.gain is not None and abs(self.gain) > self.gain_ci95


def _seed_averaged(runs: list[Run], seeds: list[int], model: str = "reported") -> np.ndarray:
    """Per-episode scores of the reported model (or the "student") averaged over `seeds`, shape (episodes,)."""
    by_seed = {run.key.seed: run.scores if model == "reported" else run.student_scores for run in runs}
    return np.mean([by_seed[seed] for seed in seeds], axis=0)


def _check_same_episodes(runs: list[Run]) -> None:
    signatures = {(run.config.get("trainer", {}).get("episode_seed"), len(run.scores), run.metric): run.run_dir
                  for run in runs}
    if len(signatures) > 1:
        described = "; ".join(f"{d}: episode_seed={s}, {n} episodes, {m}" for (s, n, m), d in signatures.items())
        raise TableError(f"cannot compare runs scored on different test episodes or metrics: {described}")


def _cell(key: tuple, runs: list[Run]) -> Cell:
    cell = Cell(*key, Arm([r for r in runs if not r.key.simt]), Arm([r for r in runs if r.key.simt]))
    base, simt = cell.baseline, cell.simt
    if not base.done + simt.done:
        return cell
    _check_same_episodes(base.done + simt.done)
    first = (base.done + simt.done)[0]
    cell.metric, cell.lower_is_better = first.metric, first.results["objective_direction"] == "minimize"
    for arm in (arm for arm in (base, simt) if arm.done):
        arm.mean, arm.ci95 = mean_ci95(_seed_averaged(arm.done, arm.seeds))
        arm.student_mean, arm.student_ci95 = mean_ci95(_seed_averaged(arm.done, arm.seeds, "student"))
    cell.paired_seeds = sorted(set(base.seeds) & set(simt.seeds))
    gain_over = lambda seeds: _seed_averaged(simt.done, seeds) - _seed_averaged(base.done, seeds)  # noqa: E731
    if cell.paired_seeds:
        cell.gain, cell.gain_ci95 = mean_ci95(gain_over(cell.paired_seeds))
        cell.per_seed_gains = [float(np.mean(gain_over([seed]))) for seed in cell.paired_seeds]
    return cell


def aggregate(runs: Iterable[Run]) -> list[Cell]:
    """One Cell per (dataset, backbone, algorithm, shots), ordered as the table reads."""
    by_cell: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        by_cell[run.key.cell].append(run)
    order = lambda key: (key[0], key[1], ALGORITHMS.index(key[2]), key[3])  # noqa: E731
    return [_cell(key, by_cell[key]) for key in sorted(by_cell, key=order)]


# -- published numbers ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Published:
    value: float
    ci95: float | None
    source: str   # where exactly the number is from: paper, table, row and column


PUBLISHED_KEYS = ("dataset", "backbone", "algorithm", "shots", "simt", "value", "source")


def load_published(path: Path | str) -> dict[tuple, Published]:
    """(dataset, backbone, algorithm, shots, simt) -> Published, from a YAML list under `entries:`."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    entries = (data.get("entries") or []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise TableError(f"{path}: expected a mapping with a list under 'entries:'")
    table = {}
    for i, entry in enumerate(entries):
        lacking = [k for k in PUBLISHED_KEYS if k not in entry] if isinstance(entry, dict) else list(PUBLISHED_KEYS)
        if lacking or not isinstance(entry["simt"], bool):
            raise TableError(f"{path}: entry {i} lacks {', '.join(lacking) or 'a true/false simt'} "
                             f"(expected keys {', '.join(PUBLISHED_KEYS)}, optional ci95)")
        key = (entry["dataset"], entry["backbone"], entry["algorithm"], int(entry["shots"]), entry["simt"])
        if key in table:
            raise TableError(f"{path}: entry {i} repeats {key}")
        ci95 = entry.get("ci95")
        table[key] = Published(float(entry["value"]), None if ci95 is None else float(ci95), str(entry["source"]))
    return table


def _published(cell: Cell, published: dict) -> list[Published | None]:
    """[baseline, SiMT] entries for the cell."""
    return [published.get((cell.dataset, cell.backbone, cell.algorithm, cell.shots, simt)) for simt in (False, True)]


# -- table.md -----------------------------------------------------------------------------------------

def _fmt(x: float, sign: bool = False, scale: float = 0.0) -> str:
    """Two decimals; values that are tiny on their own scale (`scale`: e.g. the CI beside them), such as
    small regression errors, keep two significant digits instead."""
    text = f"{x:+.2f}" if max(abs(x), scale) >= 0.1 or x == 0 else f"{x:+.2g}"
    return text if sign else text.lstrip("+")


def _arm_text(arm: Arm, model: str = "reported") -> str:
    if not arm.done:
        return arm.problem
    mean, ci95 = (arm.mean, arm.ci95) if model == "reported" else (arm.student_mean, arm.student_ci95)
    return f"{_fmt(mean)} ± {_fmt(ci95)}" + (f" ({arm.problem})" if arm.problem else "")


def _gain_text(cell: Cell) -> str:
    if cell.gain is None:
        return "n/a (no seed finished in both arms)"
    low, high = cell.gain - cell.gain_ci95, cell.gain + cell.gain_ci95
    text = (f"{_fmt(cell.gain, True, cell.gain_ci95)} [{_fmt(low, True, cell.gain_ci95)}, "
            f"{_fmt(high, True, cell.gain_ci95)}]") + "*" * cell.significant
    if len(cell.paired_seeds) < max(len(cell.baseline.seeds), len(cell.simt.seeds)):
        text += f" (seeds {','.join(map(str, cell.paired_seeds))})"  # fewer seeds than the arms' means
    return text


def _published_text(cell: Cell, published: dict) -> str:
    entries = _published(cell, published)
    text = lambda p: "—" if p is None else _fmt(p.value) + (f" ± {_fmt(p.ci95)}" if p.ci95 is not None else "")  # noqa: E731
    return " → ".join(map(text, entries)) if any(entries) else "—"


def _metric_text(cells: list[Cell]) -> str:
    cell = next((c for c in cells if c.metric), None)
    if cell is None:
        return "?"
    return f"{cell.metric} ↓ (lower is better)" if cell.lower_is_better else f"{cell.metric} ↑"


def _markdown_table(cells: list[Cell], published: dict) -> list[str]:
    shots = sorted({c.shots for c in cells})
    rows = list(dict.fromkeys((c.setting, c.algorithm) for c in cells))
    several_settings = len({setting for setting, _ in rows}) > 1
    by_key = {(c.setting, c.algorithm, c.shots): c for c in cells}
    header = ["data set / backbone"] * several_settings + ["algorithm", "metric"]
    for k in shots:
        header += [f"{k}-shot baseline", f"{k}-shot SiMT", f"{k}-shot SiMT's student", f"{k}-shot gain [paired 95% CI]",
                   f"{k}-shot published (baseline → SiMT)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting, algorithm in rows:
        row_cells = [by_key.get((setting, algorithm, k)) for k in shots]
        row = [setting] * several_settings + [algorithm, _metric_text([c for c in row_cells if c])]
        for cell in row_cells:  # a shot setting outside the grid for this row stays blank
            row += [_arm_text(cell.baseline), _arm_text(cell.simt), _arm_text(cell.simt, "student"), _gain_text(cell),
                    _published_text(cell, published)] if cell else [""] * 5
        lines.append("| " + " | ".join(row) + " |")
    return lines


# name -> config path; the SiMT hyperparameters are read from SiMT runs only.
DERIVED_PROTOCOL = {"outer steps": "trainer.steps", "test episodes": "trainer.eval_tasks",
                    "test episode seed": "trainer.episode_seed", "ways": "task.ways",
                    "queries per class": "task.queries", "meta-batch": "task.meta_batch_size",
                    "inner steps (train)": "algo.inner_steps", "inner steps (test)": "algo.eval_inner_steps",
                    "SiMT η": "simt.eta", "SiMT λ": "simt.lam", "SiMT dropout p": "simt.drop_p"}


def _config_values(runs: list[Run], path: str) -> str:
    values = set()
    for run in runs:
        node = run.config
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values |= {node} - {None}
    return ", ".join(map(str, sorted(values, key=lambda v: (str(type(v)), v)))) or "—"


def _protocol_lines(runs: list[Run], protocol: dict) -> list[str]:
    started = [run for run in runs if run.config]
    lines = ["## Protocol", ""] + [f"- {key}: {value}" for key, value in protocol.items()]
    for name, path in DERIVED_PROTOCOL.items():
        scope = [run for run in started if run.key.simt or not path.startswith("simt.")]
        lines.append(f"- {name} (from the run configs): {_config_values(scope, path)}")
    lines += [f"- seeds (from the runs): {', '.join(map(str, sorted({run.key.seed for run in runs})))}",
              "", "## Reported model", ""]
    for arm, simt in (("baseline", False), ("SiMT", True)):
        reported = sorted({r.results["reported_model"] for r in runs if r.status == "done" and r.key.simt == simt})
        lines.append(f"- {arm} rows: " + ("; ".join(REPORTED_MODELS.get(m, m) for m in reported) or "no finished run"))
    return lines + ["- checkpoint: the validation step where the reported model scored best (val/best)"]


def _markdown(cells: list[Cell], runs: list[Run], protocol: dict, published: dict) -> str:
    lines = ["# Baseline vs SiMT", "",
             "Mean ± 95% CI over test episodes (scores averaged over seeds first). Gain = SiMT - baseline, paired "
             "per test episode; * = the paired CI excludes 0. ↑: higher is better, an improvement is a positive "
             "gain; ↓: lower is better, an improvement is a negative gain.", ""]
    lines += _markdown_table(cells, published) + [""] + _protocol_lines(runs, protocol)
    sources = sorted({p.source for c in cells for p in _published(c, published) if p})
    if sources:
        lines += ["", "## Published numbers", ""] + [f"- {source}" for source in sources]
    return "\n".join(lines) + "\n"


# -- CSV files and plots ----------------------------------------------------------------------------

def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _cell_row(cell: Cell, published: dict) -> dict:
    row = {"dataset": cell.dataset, "backbone": cell.backbone, "algorithm": cell.algorithm, "shots": cell.shots,
           "metric": cell.metric, "direction": "minimize" if cell.lower_is_better else "maximize"}
    for name, arm in (("baseline", cell.baseline), ("simt", cell.simt)):
        row |= {f"{name}_mean": arm.mean, f"{name}_ci95": arm.ci95, f"{name}_seeds": " ".join(map(str, arm.seeds)),
                f"{name}_problem": arm.problem}
    row |= {"simt_student_mean": cell.simt.student_mean, "simt_student_ci95": cell.simt.student_ci95}
    base, simt = _published(cell, published)
    return row | {"gain": cell.gain, "gain_ci95": cell.gain_ci95, "significant": cell.significant,
                  "paired_seeds": " ".join(map(str, cell.paired_seeds)),
                  "per_seed_gains": " ".join(f"{g:.4f}" for g in cell.per_seed_gains),
                  "published_baseline": base and base.value, "published_simt": simt and simt.value}


def _run_row(run: Run) -> dict:
    k = run.key
    return {"cell": f"{k.dataset}/{k.backbone}/{k.algorithm}/{k.shots}-shot", "seed": k.seed, "simt": k.simt,
            "status": run.status, "run_dir": run.run_dir or "",
            "test_mean": float(np.mean(run.scores)) if run.status == "done" else None}


def _figure(rows: int, cols: int, panel_size: tuple[float, float]):
    from matplotlib.figure import Figure  # no pyplot: no global backend state; PNGs render with Agg
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _plot_gains(cells: list[Cell], path: Path) -> None:
    """Baseline and SiMT bars with CI whiskers per algorithm; one panel per (setting, shots)."""
    panels = list(dict.fromkeys((c.setting, c.shots) for c in cells))
    fig, axes = _figure(len(panels), 1, (5, 3.5))
    for ax, (setting, shots) in zip(axes[:, 0], panels):
        panel = [c for c in cells if (c.setting, c.shots) == (setting, shots)]
        x = np.arange(len(panel))
        for offset, name, arms in ((-0.2, "baseline", [c.baseline for c in panel]),
                                   (0.2, "SiMT", [c.simt for c in panel])):
            ax.bar(x + offset, [a.mean if a.done else np.nan for a in arms], 0.4, label=name, capsize=3,
                   yerr=[a.ci95 if a.done else np.nan for a in arms])
            for xi, arm in zip(x, arms):  # failed / missing runs are written on the plot, not left out
                if arm.problem:
                    ax.annotate(arm.problem, (xi + offset, 0), rotation=90, fontsize=7, ha="center", va="bottom")
        ax.set_xticks(x, [c.algorithm + "*" * c.significant for c in panel])
        ax.set_title(f"{setting}, {shots}-shot (* significant gain)", fontsize=9)
        ax.set_ylabel(_metric_text(panel)), ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    fig.savefig(path, dpi=100)


def _mean_curve(runs: list[Run], model: str) -> tuple[list[int], list[float]]:
    """Validation curve of `model` averaged over runs, at the steps every run validated."""
    histories = [{h["step"]: h[model] for h in run.results["val/history"] if model in h} for run in runs]
    steps = sorted(set.intersection(*(set(h) for h in histories))) if histories else []
    return steps, [float(np.mean([h[step] for h in histories])) for step in steps]


def _plot_curves(cells: list[Cell], path: Path) -> None:
    """Validation curves, baseline student vs SiMT target (and, dotted, SiMT's student: the target catching up
    with it); a row per (setting, shots), a panel per algorithm."""
    rows = list(dict.fromkeys((c.setting, c.shots) for c in cells))
    algorithms = [a for a in ALGORITHMS if any(c.algorithm == a for c in cells)]
    fig, axes = _figure(len(rows), len(algorithms), (3.5, 2.8))
    by_key = {(c.setting, c.shots, c.algorithm): c for c in cells}
    for (setting, shots), row_axes in zip(rows, axes):
        for algorithm, ax in zip(algorithms, row_axes):
            cell = by_key.get((setting, shots, algorithm))
            if cell is None:
                ax.axis("off")
                continue
            for arm, name, model, style in ((cell.baseline, "baseline", "student", "-"),
                                            (cell.simt, "SiMT", "target", "-"), (cell.simt, "SiMT", "student", ":")):
                ax.plot(*_mean_curve(arm.done, model), style, marker=".",
                        label=f"{name} ({model}) {arm.problem}".strip())
            ax.set_title(f"{setting} {shots}-shot {algorithm}", fontsize=9)
            ax.set_xlabel("step"), ax.set_ylabel(f"val {_metric_text([cell])}", fontsize=8), ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)


def write_outputs(cells: list[Cell], runs: list[Run], out_dir: Path | str, protocol: dict,
                  published: dict | None = None) -> str:
    """Write table.md, table.csv, runs.csv, gains.png and curves.png into out_dir; returns table.md's text."""
    if not cells:
        raise TableError(f"{out_dir}: no runs to tabulate (expected at least one run directory or expected run)")
    out_dir, published = Path(out_dir), published or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = _markdown(cells, runs, protocol, published)
    (out_dir / "table.md").write_text(markdown)
    _write_csv(out_dir / "table.csv", [_cell_row(cell, published) for cell in cells])
    runs = sorted(runs, key=lambda run: (str(run.key.cell), run.key.simt, run.key.seed))
    _write_csv(out_dir / "runs.csv", [_run_row(run) for run in runs])
    _plot_gains(cells, out_dir / "gains.png")
    _plot_curves(cells, out_dir / "curves.png")
    return markdown
