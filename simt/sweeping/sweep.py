"""The sweep loop: read the named sweep, check the search space, then claim, launch and tell trials.

Settings come from three layers, later ones winning: DEFAULTS below, the named sweep file
(`sweeps/<hydra.sweeper.sweep>.yaml`), and `hydra.sweeper.*` on the command line. The search space is the
file's `params` followed by the command line's task overrides, in Hydra's sweep syntax:
`interval(a, b)`, `tag(log, interval(a, b))`, `tag(int, interval(a, b))`, `choice(x, y)`, `range(a, b, s)`,
`x,y`, and plain values, which fix a key for every trial.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.utils import JobStatus, env_override
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict, read_write

from simt.sweeping import STORAGE_ENV, STUDY_ENV, TRIAL_ID_ENV
from simt.sweeping.results import write_results
from simt.sweeping.study import (ERROR, PRUNER_ATTR, RESUME, RETRY_OF, RUN_DIR, Heartbeat, SweepError, claim_trials,
                                 counts_toward_budget, fail_interrupted, fail_own_trials, grid_space, make_pruner,
                                 make_sampler, open_storage, split_spec, study_lock, trial_run_dir, trial_subdir)

log = logging.getLogger(__name__)

DEFAULTS = {"n_trials": 20, "n_jobs": None, "storage": "sqlite:///studies/optuna.db", "study_name": None,
            "direction": "auto", "sampler": {"name": "tpe", "seed": 0}, "pruner": {"name": "median"}}


@dataclass
class Space:
    """The search space: Optuna distributions, and the overrides every trial shares."""
    distributions: dict[str, optuna.distributions.BaseDistribution]
    fixed: list[str]      # task overrides, e.g. ["simt.enabled=true", "trainer=smoke"]
    question: list[str]   # the command line's fixed overrides: they name the study (algo=protonet ...)


# -- settings and search space ----------------------------------------------------------------------

def load_settings(cli: dict, sweeps_dir: Path) -> tuple[dict, dict]:
    """(settings, file params) from DEFAULTS, the named sweep file and the CLI's hydra.sweeper.* values."""
    path = Path(cli["sweep"]) if str(cli["sweep"]).endswith((".yaml", ".yml")) else sweeps_dir / f"{cli['sweep']}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in sweeps_dir.glob("*.yaml")))
        raise SweepError(f"hydra.sweeper.sweep={cli['sweep']!r}: no file {path} (named sweeps: {names})")
    from_file = yaml.safe_load(path.read_text()) or {}
    unknown = set(from_file) - set(DEFAULTS) - {"params"}
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (expected params, {', '.join(DEFAULTS)})")
    settings = {**DEFAULTS, **{k: v for k, v in from_file.items() if k != "params"}}
    for key, value in cli.items():
        if value is None or key == "sweep":
            continue
        if key in ("sampler", "pruner") and isinstance(value, dict) and isinstance(settings[key], dict) \
                and value.get("name", settings[key].get("name")) == settings[key].get("name"):
            value = {**settings[key], **value}  # hydra.sweeper.sampler.seed=3 keeps the file's sampler
        settings[key] = value
    settings["sweep"] = path.stem
    return settings, from_file.get("params") or {}


def distribution(override: Override) -> optuna.distributions.BaseDistribution:
    sweep, key = override.value(), override.key_or_group
    if isinstance(sweep, IntervalSweep):
        log_scale = "log" in sweep.tags
        if "int" in sweep.tags:
            return optuna.distributions.IntDistribution(int(sweep.start), int(sweep.end), log=log_scale)
        return optuna.distributions.FloatDistribution(sweep.start, sweep.end, log=log_scale)
    if isinstance(sweep, RangeSweep):
        values = []
        while (value := sweep.start + len(values) * sweep.step) < sweep.stop:
            values.append(value)
        if not values:
            raise SweepError(f"{key}=range({sweep.start}, {sweep.stop}, {sweep.step}): an empty range")
        if all(isinstance(v, int) for v in (sweep.start, sweep.step)):
            return optuna.distributions.IntDistribution(values[0], values[-1], step=sweep.step)
        return optuna.distributions.CategoricalDistribution(values)
    if isinstance(sweep, ChoiceSweep):
        return optuna.distributions.CategoricalDistribution(list(sweep.list))
    raise SweepError(f"{key}: {type(sweep).__name__} cannot be searched by Optuna")


def parse_space(file_params: dict, arguments: list[str]) -> Space:
    """Later overrides of a key replace earlier ones, so the command line wins over the file."""
    lines = [f"{key}={_yaml_value(value)}" for key, value in file_params.items()] + list(arguments)
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
    except HydraException as error:
        raise SweepError(f"search space: {first_lines(error)}") from None
    by_key = {override.key_or_group: override for override in overrides}
    distributions = {key: distribution(o) for key, o in by_key.items() if o.is_sweep_override()}
    fixed = {key: f"{o.get_key_element()}={quoted(o.value())}"
             for key, o in by_key.items() if not o.is_sweep_override()}
    from_cli = {o.key_or_group for o in overrides[len(file_params):]}
    return Space(distributions, list(fixed.values()), [line for key, line in fixed.items() if key in from_cli])


def first_lines(error: Exception) -> str:
    """Hydra's message in one line: its first two lines say what and why."""
    return " ".join(line.strip() for line in str(error).splitlines()[:2] if line.strip())


def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def quoted(value) -> str:
    """A value as Hydra's override grammar reads it back (strings quoted unless plainly a word)."""
    if isinstance(value, str) and not value.replace("_", "").replace("-", "").replace(".", "").isalnum():
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return _yaml_value(value)


def as_override(key: str, value) -> str:
    return f"{key}={quoted(value)}"


def corners(space: Space) -> list[list[str]]:
    """Override lists that put each searched key at each end (or choice) once: enough to catch a key
    that does not exist or a range the config rejects, before any trial runs."""
    def ends(dist):
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            return list(dist.choices)
        return [dist.low, dist.high]
    base = {key: ends(dist)[0] for key, dist in space.distributions.items()}
    points = [base] + [{**base, key: value} for key, dist in space.distributions.items() for value in ends(dist)[1:]]
    return [space.fixed + [as_override(k, v) for k, v in point.items()] for point in points]


# -- the loop ---------------------------------------------------------------------------------------

def run_sweep(sweeper, arguments: list[str]) -> None:
    """Run (or resume) the study, then write the results; exits 2 on a bad setting, 1 if nothing completed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep logs one line per trial itself
    config, loader = sweeper.config, sweeper.hydra_context.config_loader
    try:
        cli = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
               for k, v in sweeper.settings.items()}
        settings, file_params = load_settings(cli, sweeps_dir_of(config))
        space = parse_space(file_params, arguments)
        direction = check_space(space, settings["direction"], lambda o: loader.load_sweep_config(config, o))
        study, url = open_study(settings, space, direction)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if split_spec(settings["sampler"], "sampler")[0] == "grid":  # a grid has a natural size: stop when it is covered
        settings["n_trials"] = min(settings["n_trials"], math.prod(map(len, grid_space(space.distributions).values())))
    n_jobs = settings["n_jobs"] or OmegaConf.select(config, "hydra.launcher.n_jobs", default=None) or 1
    n_jobs = max(1, int(n_jobs))
    sweep_dir = Path(config.hydra.sweep.dir)
    log.info("study %r in %s: %d trials, %d at a time; space %s; fixed %s", study.study_name, url,
             settings["n_trials"], n_jobs, {k: str(d) for k, d in space.distributions.items()}, space.fixed)

    heartbeat, started, job_idx, finished = Heartbeat(study), time.time(), 0, 0
    try:
        sampler_for = lambda k: make_sampler(reseeded(settings["sampler"], k), space.distributions)  # noqa: E731
        while trials := claim_trials(study, url, settings["n_trials"], n_jobs, space.distributions, sampler_for,
                                     sweep_dir):
            heartbeat.trial_ids.update(t._trial_id for t in trials)
            for trial in trials:
                if trial.user_attrs.get(RETRY_OF) is not None:
                    place_retry(trial, space, lambda o: loader.load_sweep_config(config, o), sweep_dir)
            batch = [trial_overrides(trial, space, url) for trial in trials]
            returns = sweeper.launcher.launch(batch, initial_job_idx=job_idx)
            job_idx += len(batch)
            for trial, result in zip(trials, returns):
                tell(study, trial, result)
                heartbeat.trial_ids.discard(trial._trial_id)
            finished += len(trials)
            log_progress(study, settings["n_trials"], finished, started)
    except BaseException:
        fail_own_trials(study, heartbeat.trial_ids)
        raise
    finally:
        heartbeat.stop()
    fail_interrupted(study)
    summary = write_results(study, sweep_dir, space, url)
    log.info(summary)
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        print(f"error: no trial completed ({summary})", file=sys.stderr)
        sys.exit(1)


def reseeded(spec, offset: int):
    """The sampler spec with its seed (if any) moved on by `offset`."""
    name, kwargs = split_spec(spec, "sampler")
    if kwargs.get("seed") is not None:
        kwargs["seed"] = int(kwargs["seed"]) + offset
    return {"name": name, **kwargs}


def sweeps_dir_of(config) -> Path:
    """`sweeps/` beside the primary config directory (this project's conf/ unless --config-dir names another),
    wherever the command runs from."""
    for source in config.hydra.runtime.config_sources:
        if source.provider == "main" and source.schema == "file":
            return Path(source.path).resolve().parent / "sweeps"
    from simt.pipeline import CONF_DIR
    return CONF_DIR.parent / "sweeps"


def check_space(space: Space, direction: str, compose) -> str:
    """Compose and validate the config at every corner of the space; returns the study direction."""
    from simt import pipeline
    cfg = None
    for overrides in corners(space):
        try:
            cfg = compose(overrides)
            pipeline.check_config(cfg)
        except HydraException as error:
            raise SweepError(f"search space: {first_lines(error)}") from None
        except pipeline.ConfigError as error:
            raise SweepError(f"search space: {error}") from None
    if direction == "auto":
        return pipeline.objective_direction(cfg)
    if direction not in ("maximize", "minimize"):
        raise SweepError(f"hydra.sweeper.direction={direction!r}: expected auto, maximize or minimize")
    return direction


def open_study(settings: dict, space: Space, direction: str) -> tuple[optuna.Study, str]:
    url = settings["storage"]
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):  # relative: pin it to this directory
        url = f"sqlite:///{(Path.cwd() / url.removeprefix('sqlite:///')).resolve()}"
    name = settings["study_name"] or default_study_name(settings["sweep"], space.question)
    with study_lock(url, "simt:create-study"):
        study = optuna.create_study(storage=open_storage(url), study_name=name, direction=direction,
                                    load_if_exists=True, sampler=make_sampler(settings["sampler"], space.distributions),
                                    pruner=make_pruner(settings["pruner"]))
    if study.direction.name.lower() != direction:
        raise SweepError(f"hydra.sweeper.study_name={name!r}: the stored study {study.direction.name.lower()}s, "
                         f"this sweep would {direction} (use another study name)")
    study.set_user_attr(PRUNER_ATTR, settings["pruner"] if not isinstance(settings["pruner"], str)
                        else {"name": settings["pruner"]})
    return study, url


def default_study_name(sweep: str, fixed: list[str]) -> str:
    """The sweep's name plus the command-line choices that make it another question (algo=protonet ...)."""
    return sweep + (f"[{','.join(sorted(fixed))}]" if fixed else "")


def place_retry(trial: optuna.Trial, space: Space, compose, sweep_dir: Path) -> None:
    """Let a retry continue the interrupted trial's run in its directory when that can work; else run the
    same parameters from the start in a directory of its own (see study.py on retries)."""
    previous = Path(trial.user_attrs[RUN_DIR])
    try:
        problem = _resume_problem(trial, space, compose, previous)
    except Exception as error:  # noqa: BLE001 - whatever it is, a fresh start is safe; the sweep goes on
        problem = f"checking it failed: {type(error).__name__}: {first_lines(error)}"
    if problem is None:
        trial.set_user_attr(RESUME, True)
        log.info("trial %d resumes interrupted trial %d in %s", trial.number, trial.user_attrs[RETRY_OF], previous)
        return
    fresh = trial_run_dir(sweep_dir, trial.number)
    trial.set_user_attr(RUN_DIR, fresh)
    log.warning("trial %d runs interrupted trial %d's parameters from the start in %s: %s", trial.number,
                trial.user_attrs[RETRY_OF], fresh, problem)


def _resume_problem(trial: optuna.Trial, space: Space, compose, run_dir: Path) -> str | None:
    from simt import pipeline
    if not run_dir.is_dir():
        return f"{run_dir} does not exist on this machine"
    if "${" in str(run_dir) or "\\" in str(run_dir):
        return f"{run_dir}: a path a Hydra override cannot carry"
    cfg = compose([*space.fixed, *(as_override(k, v) for k, v in trial.params.items()), "trainer.resume=true"])
    env = {}
    if "hydra" in cfg:
        env = OmegaConf.to_container(cfg.hydra.job.env_set, resolve=True) if "job" in cfg.hydra else {}
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]  # the job's config, as Hydra hands it to run.py
    with env_override({k: str(v) for k, v in env.items()}):  # the job resolves its config in its environment
        return pipeline.resume_problem(cfg, run_dir)


def trial_overrides(trial: optuna.Trial, space: Space, url: str) -> list[str]:
    """One job's overrides: the shared ones, the trial's values, where it runs, and where to report (see
    __init__). A retry that resumes runs in the interrupted trial's directory (see place_retry)."""
    resumed = trial.user_attrs.get(RESUME) and Path(trial.user_attrs[RUN_DIR])
    where = ([f"hydra.sweep.dir={quoted(str(resumed.parent))}", f"hydra.sweep.subdir={quoted(resumed.name)}",
              "trainer.resume=true"] if resumed
             else [f"hydra.sweep.subdir={trial_subdir(trial.number)}"])  # unique across resumed and parallel sweeps
    return [*space.fixed, *(as_override(k, v) for k, v in trial.params.items()), *where,
            f"+hydra.job.env_set.{STORAGE_ENV}={quoted(url)}",
            f"+hydra.job.env_set.{STUDY_ENV}={quoted(trial.study.study_name)}",
            f"+hydra.job.env_set.{TRIAL_ID_ENV}={trial._trial_id}"]


def tell(study: optuna.Study, trial: optuna.Trial, result) -> None:
    TrialState = optuna.trial.TrialState
    run_dir = OmegaConf.select(result.hydra_cfg or {}, "hydra.runtime.output_dir", default=None)
    if run_dir:
        trial.set_user_attr(RUN_DIR, os.path.abspath(run_dir))
    outcome = result._return_value
    if result.status == JobStatus.COMPLETED and isinstance(outcome, (int, float)) and math.isfinite(outcome):
        record(study, trial, float(outcome))
        log.info("trial %d: %.4g  %s", trial.number, outcome, trial.params)
        return
    if isinstance(outcome, optuna.TrialPruned):
        record(study, trial, state=TrialState.PRUNED)  # Optuna records the last reported value
        log.info("trial %d: pruned (%s)  %s", trial.number, outcome, trial.params)
        return
    reason = (f"{type(outcome).__name__}: {outcome}" if result.status != JobStatus.COMPLETED
              else f"the objective is {outcome!r}, not a finite number")
    trial.set_user_attr(ERROR, reason.splitlines()[0][:500])
    record(study, trial, state=TrialState.FAIL)
    log.warning("trial %d: FAIL (%s)  %s", trial.number, reason.splitlines()[0], trial.params)


def record(study: optuna.Study, trial: optuna.Trial, value: float | None = None, state=None) -> None:
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as error:  # the grid sampler calls study.stop() when its grid is covered; the
        if "Study.stop" not in str(error):  # trial is stored by then, and the budget ends the loop anyway
            raise


def log_progress(study: optuna.Study, n_trials: int, finished_here: int, started: float) -> None:
    """`k/n trials finished, best v (trial i); about m min left`, the ETA from this process's pace."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and counts_toward_budget(t)]
    best = study.best_trial if any(t.state == optuna.trial.TrialState.COMPLETE for t in trials) else None
    left = (time.time() - started) / finished_here * max(0, n_trials - len(trials))
    log.info("%d/%d trials finished%s; about %s left", len(trials), n_trials,
             f", best {best.value:.4g} (trial {best.number})" if best else "",
             f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min" if left < 5400 else f"{left / 3600:.1f} h")
