"""What a finished sweep leaves in its directory: the best trial as YAML and as a command, every trial as
CSV, and three plots (optimization history, parameter importances, and one slice per parameter).

Everything is read back from the study, so a resumed or distributed sweep reports all of its trials.
"""
from __future__ import annotations

import csv
import logging
import os
import shlex
import textwrap
import warnings
from collections import Counter
from pathlib import Path

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from simt.sweeping.study import ERROR, INTERRUPTED, RETRY_OF, RUN_DIR

log = logging.getLogger(__name__)


def state_of(trial: FrozenTrial) -> str:
    return "interrupted" if trial.user_attrs.get(INTERRUPTED) else trial.state.name.lower()


def best_command(study: optuna.Study, fixed: list[str]) -> str:
    params = [f"{key}={value}" for key, value in study.best_trial.params.items()]
    return "python run.py " + " ".join(shlex.quote(o) for o in [*fixed, *params])


def write_results(study: optuna.Study, sweep_dir: Path, space, url: str) -> str:
    """Write the files; returns the one-line summary the sweep ends with."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    counts = Counter(state_of(t) for t in trials)
    summary = {"study_name": study.study_name, "storage": url, "direction": study.direction.name.lower(),
               "trials": {s: counts.get(s, 0) for s in ("complete", "pruned", "fail", "interrupted", "running")}}
    tally = ", ".join(f"{n} {s}" for s, n in summary["trials"].items() if n or s in ("complete", "pruned", "fail"))
    line = f"sweep finished: {tally} (study {study.study_name!r} in {url})"
    if counts["complete"]:
        best = study.best_trial
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                       best_run_dir=best.user_attrs.get(RUN_DIR), command=best_command(study, space.fixed))
        line += f"; best {best.value:.4g} (trial {best.number}): {summary['command']}"
    _write_atomic(sweep_dir / "optimization_results.yaml", yaml.safe_dump(summary, sort_keys=False))
    write_trials_csv(trials, sweep_dir / "trials.csv")
    plot_study(study, sweep_dir)
    return line


def write_trials_csv(trials: list[FrozenTrial], path: Path) -> None:
    names = sorted({key for t in trials for key in t.params})
    rows = [{"number": t.number, "state": state_of(t), "value": t.value if t.value is not None else
             (t.intermediate_values[t.last_step] if t.last_step is not None else ""),
             **{f"params.{k}": t.params.get(k, "") for k in names},
             "last_step": t.last_step if t.last_step is not None else "",
             "duration_s": f"{t.duration.total_seconds():.1f}" if t.duration else "",
             "run_dir": t.user_attrs.get(RUN_DIR, ""), "retry_of": t.user_attrs.get(RETRY_OF, ""),
             "error": t.user_attrs.get(ERROR, "")} for t in trials]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["number", "state", "value", *(f"params.{k}" for k in names),
                                                    "last_step", "duration_s", "run_dir", "retry_of", "error"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- plots ------------------------------------------------------------------------------------------

def plot_study(study: optuna.Study, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on a cluster node
    import matplotlib.pyplot as plt

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if t.last_step is not None]
    if not complete:
        return
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([t.number for t in complete], [t.value for t in complete], label="complete", zorder=3)
    ax.scatter([t.number for t in pruned], [t.intermediate_values[t.last_step] for t in pruned], marker="x",
               color="grey", label="pruned (last value)", zorder=3)
    best, running = [], None
    for t in sorted(complete, key=lambda t: t.number):
        running = t.value if running is None else (max if maximize else min)(running, t.value)
        best.append((t.number, running))
    ax.step(*zip(*best), where="post", color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel=f"objective ({'higher' if maximize else 'lower'} is better)")
    ax.set_title(textwrap.fill(f"optimization history: {study.study_name}", 70), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "optimization_history.png", dpi=120)
    plt.close(fig)

    names = sorted({k for t in complete for k in t.params if isinstance(t.params[k], (int, float))})
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False, sharey=True)
        for ax, name in zip(axes[0], names):
            points = [(t.params[name], t.value, t.number) for t in complete if name in t.params]
            x, y, number = zip(*points)
            dots = ax.scatter(x, y, c=number, cmap="viridis")
            ax.set(xlabel=name)
        axes[0][0].set_ylabel("objective")
        fig.colorbar(dots, ax=axes[0].tolist(), label="trial")
        fig.savefig(out_dir / "slice.png", dpi=120, bbox_inches="tight")
        plt.close(fig)

    # PED-ANOVA needs no scikit-learn; with too few trials it warns and returns equal importances,
    # which would be a misleading plot, so then there is none.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except (RuntimeError, ValueError, ZeroDivisionError) as error:
            caught.append(error)
    if caught:
        log.info("parameter importances skipped: %s", getattr(caught[0], "message", caught[0]))
    elif importances:
        fig, ax = plt.subplots(figsize=(5, 0.6 * len(importances) + 1.2))
        ax.barh(list(importances)[::-1], list(importances.values())[::-1])
        ax.set(xlabel="importance (PED-ANOVA)", title="parameter importances")
        fig.tight_layout()
        fig.savefig(out_dir / "param_importances.png", dpi=120)
        plt.close(fig)
