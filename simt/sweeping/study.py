"""Optuna's side of a sweep: storages, the claim lock, interrupted trials, samplers, pruners.

Storage URLs: `sqlite:///path.db` (the default), `postgresql://user@host/db` (many machines, one study) and
`journal:path.log` (Optuna's journal file: several processes on one machine, no database server).

Why a lock: every sweep process draws trials until the study holds `n_trials` of them. Counting and then
asking are two storage calls, so two processes finishing at the same moment could both see one trial
missing and both ask; the lock (a file lock beside an SQLite or journal file, an advisory lock on
PostgreSQL) makes count-then-ask atomic, so a study never gets more trials than asked for.

Why owners and heartbeats: a sweep killed mid-trial leaves that trial RUNNING forever. Each claimed trial
records its owner (host, pid) and a heartbeat refreshed while it runs; a later sweep marks a RUNNING trial
FAIL (`interrupted`) when its owner process is gone from this host, or its heartbeat is older than
STALE_AFTER_S (an owner on another machine). Interrupted trials do not count toward `n_trials`.

Why retries: an interruption (a killed sweep, a lost machine) says nothing about the trial's parameters,
and replacing it with a fresh draw would lose a grid cell, or hours of training. So the next claim asks
the same parameters again first, and the sweep (sweep.place_retry) runs them in the interrupted trial's
run directory with trainer.resume=true: the run continues from its last checkpoint (or returns its result
if training had finished). Where that cannot work (the directory is on another machine, a job of the dead
sweep still runs in it, the config changed) the retry starts afresh in a directory of its own. A trial
interrupted again is retried again, up to MAX_RETRIES times. Trials interrupted before run directories
were recorded (older versions of this code replaced them with a fresh draw then) are not retried.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

HEARTBEAT_S = 30          # how often a sweep refreshes the heartbeat of the trials it runs
STALE_AFTER_S = 180       # a RUNNING trial silent this long belongs to a dead sweep
MAX_RETRIES = 2           # an interrupted trial is resumed at most this many times, then given up
OWNER, HEARTBEAT, INTERRUPTED, ERROR, RUN_DIR = ("simt:owner", "simt:heartbeat", "simt:interrupted",
                                                 "simt:error", "simt:run_dir")
RETRY_OF, RETRIES = "simt:retry_of", "simt:retries"  # the interrupted trial a trial retries; how many before it
RESUME = "simt:resume"  # true: the retry continues the interrupted trial's run in its directory
PRUNER_ATTR = "simt:pruner"  # the study's pruner spec, so that jobs build the same pruner


class SweepError(ValueError):
    """A bad sweep setting or search space; the message is one line naming the key."""


# -- storages ---------------------------------------------------------------------------------------

def storage_file(url: str) -> Path | None:
    """The file behind a file-based storage URL (sqlite:///PATH, journal:PATH), its folder created; else None."""
    if not url.startswith(("sqlite:///", "journal:")):
        return None
    path = Path(url.removeprefix("sqlite:///").removeprefix("journal:").removeprefix("//"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def open_storage(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("journal:"):
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(storage_file(url))))
    if url.startswith("sqlite:///"):
        storage_file(url)
        # Parallel jobs report intermediate values to one file: wait for SQLite's write lock, don't fail.
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    if "://" in url:
        return optuna.storages.RDBStorage(url)
    raise SweepError(f"hydra.sweeper.storage={url!r}: expected sqlite:///PATH, postgresql://..., or journal:PATH")


@contextlib.contextmanager
def study_lock(url: str, name: str):
    """Hold the lock named `name` for this storage (see the module docstring): a count-then-ask, or the
    first creation of a study (concurrent creations of Optuna's tables collide on PostgreSQL)."""
    if path := storage_file(url):
        with open(f"{path}.simt-lock", "a") as handle:  # not .lock: Optuna's journal lock file is named so
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    elif url.startswith("postgresql"):
        from sqlalchemy import text
        key = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)
        with _lock_engine(url).connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    else:  # another database: no portable lock, so a race may add a trial beyond n_trials
        yield


@functools.lru_cache
def _lock_engine(url: str):
    import sqlalchemy
    return sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)


# -- trials: claim, heartbeat, interruption ---------------------------------------------------------

def counts_toward_budget(trial: FrozenTrial) -> bool:
    return trial.state != TrialState.WAITING and not trial.user_attrs.get(INTERRUPTED)


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_abandoned(trial: FrozenTrial, now: float) -> bool:
    owner = trial.user_attrs.get(OWNER) or {}
    if owner.get("host") == socket.gethostname() and owner.get("pid") not in (None, os.getpid()):
        return not _process_alive(owner["pid"])
    beat = trial.user_attrs.get(HEARTBEAT) or (trial.datetime_start.timestamp() if trial.datetime_start else now)
    return now - beat > STALE_AFTER_S


def fail_interrupted(study: optuna.Study) -> list[int]:
    """Mark RUNNING trials of dead sweeps FAIL (interrupted); returns their numbers."""
    storage, now, failed = study._storage, time.time(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _is_abandoned(trial, now):
            continue
        storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            if storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                failed.append(trial.number)
    if failed:
        log.warning("trials %s were left RUNNING by a sweep that died: marked FAIL (interrupted), not counted",
                    failed)
    return failed


def claim_trials(study: optuna.Study, url: str, n_trials: int, count: int, distributions: dict,
                 sampler_for: Callable[[int], optuna.samplers.BaseSampler], sweep_dir: Path | None = None) -> list:
    """Ask up to `count` trials, never letting the study exceed `n_trials` counted trials: retries of
    interrupted trials first (see the module docstring), then new ones. Each new trial's run directory
    (sweep_dir/trial_N) is recorded, so that a retry can find its checkpoint.

    `sampler_for(k)` gives the sampler for the study's k-th trial: a seeded sampler re-seeded by k, so a
    resumed sweep, or a second process, does not repeat the first trials' random draws (and one process
    alone stays reproducible)."""
    trials = []
    with study_lock(url, study.study_name):
        fail_interrupted(study)
        existing = study.get_trials(deepcopy=False)
        room = max(0, min(count, n_trials - sum(counts_toward_budget(t) for t in existing)))
        for interrupted in to_retry(existing)[:room]:
            trials.append(_retry(study, interrupted, distributions))
        for k in range(len(existing) + len(trials), len(existing) + room):
            study.sampler = sampler_for(k)
            trials.append(study.ask(distributions))
    for trial in trials:
        trial.set_user_attr(OWNER, _owner())
        trial.set_user_attr(HEARTBEAT, time.time())
        if sweep_dir is not None and RUN_DIR not in trial.user_attrs:
            trial.set_user_attr(RUN_DIR, trial_run_dir(sweep_dir, trial.number))
    return trials


def trial_subdir(number: int) -> str:
    return f"trial_{number}"


def trial_run_dir(sweep_dir: str | Path, number: int) -> str:
    """Where trial `number` runs, spelled as Hydra's output_dir is (absolute, `..` resolved), so that one
    directory has one spelling in the study and in trials.csv."""
    return os.path.abspath(os.path.join(sweep_dir, trial_subdir(number)))


def to_retry(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Interrupted trials with a recorded run directory that no trial retries yet and that have retries
    left, oldest first."""
    retried = {t.user_attrs.get(RETRY_OF) for t in trials}
    return [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED)
            and RUN_DIR in t.user_attrs and t.number not in retried and t.user_attrs.get(RETRIES, 0) < MAX_RETRIES]


def _retry(study: optuna.Study, interrupted: FrozenTrial, distributions: dict) -> optuna.Trial:
    attrs = {RETRY_OF: interrupted.number, RETRIES: interrupted.user_attrs.get(RETRIES, 0) + 1,
             RUN_DIR: interrupted.user_attrs[RUN_DIR]}  # where it resumes, if sweep.place_retry agrees
    study.enqueue_trial(interrupted.params, user_attrs=attrs)
    trial = study.ask(distributions)  # takes the enqueued (waiting) trial
    # A grid sampler knows its cells by these; without them the retry would not cover the cell.
    for key in ("grid_id", "search_space"):
        if key in interrupted.system_attrs:
            study._storage.set_trial_system_attr(trial._trial_id, key, interrupted.system_attrs[key])
    return trial


class Heartbeat:
    """Refresh the heartbeat of the trials this process runs, from a daemon thread."""

    def __init__(self, study: optuna.Study, interval: float = HEARTBEAT_S):
        self.study, self.interval, self.trial_ids = study, interval, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            for trial_id in list(self.trial_ids):
                with contextlib.suppress(Exception):  # a finished trial or a busy database: try next time
                    self.study._storage.set_trial_user_attr(trial_id, HEARTBEAT, time.time())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def fail_own_trials(study: optuna.Study, trial_ids) -> None:
    """On Ctrl-C or SIGTERM: the trials this process was running will not finish; say so now."""
    for trial_id in trial_ids:
        with contextlib.suppress(Exception):
            study._storage.set_trial_user_attr(trial_id, INTERRUPTED, True)
            study._storage.set_trial_state_values(trial_id, TrialState.FAIL)


# -- samplers and pruners ---------------------------------------------------------------------------

def split_spec(spec, key: str) -> tuple[str, dict]:
    """`tpe` or `{name: tpe, seed: 0}` -> ("tpe", {"seed": 0})."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec or {})
    if "name" not in spec:
        raise SweepError(f"hydra.sweeper.{key}: expected a name (e.g. {key}=tpe) or a mapping with `name`")
    return str(spec.pop("name")).lower(), spec


def grid_space(distributions: dict) -> dict[str, list]:
    """Every value of each searched key, for the grid sampler (intervals have no grid)."""
    space = {}
    for key, dist in distributions.items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            space[key] = list(dist.choices)
        elif getattr(dist, "step", None):
            count = int(round((dist.high - dist.low) / dist.step)) + 1
            space[key] = [dist.low + i * dist.step for i in range(count)]
        else:
            raise SweepError(f"{key}: the grid sampler needs choice(...) or range(...), not an interval")
    return space


def make_sampler(spec, distributions: dict) -> optuna.samplers.BaseSampler:
    name, kwargs = split_spec(spec, "sampler")
    if name == "grid":
        return optuna.samplers.GridSampler(grid_space(distributions), **kwargs)
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                "cmaes": optuna.samplers.CmaEsSampler, "qmc": optuna.samplers.QMCSampler}
    if name not in samplers:
        raise SweepError(f"hydra.sweeper.sampler.name={name!r}: expected one of {', '.join([*samplers, 'grid'])}")
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401  Optuna's CMA-ES sampler needs the `cmaes` package
        except ImportError:
            raise SweepError("hydra.sweeper.sampler.name='cmaes': needs the cmaes package (pip install cmaes)") from None
    return samplers[name](**kwargs)


PRUNERS = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
           "hyperband": optuna.pruners.HyperbandPruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
           "threshold": optuna.pruners.ThresholdPruner, "none": optuna.pruners.NopPruner}


def make_pruner(spec) -> optuna.pruners.BasePruner:
    name, kwargs = split_spec(spec if spec is not None else "none", "pruner")
    if name not in PRUNERS:
        raise SweepError(f"hydra.sweeper.pruner.name={name!r}: expected one of {', '.join(PRUNERS)}")
    try:
        return PRUNERS[name](**kwargs)
    except TypeError as error:
        raise SweepError(f"hydra.sweeper.pruner: {error}") from None


# -- the job side -----------------------------------------------------------------------------------

class TrialReporter:
    """Report each validation value of a training job to its trial; raise TrialPruned when told to stop."""

    def __init__(self, url: str, study_name: str, trial_id: int):
        storage = open_storage(url)
        pruner_spec = storage.get_study_user_attrs(storage.get_study_id_from_name(study_name)).get(PRUNER_ATTR)
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=make_pruner(pruner_spec))
        self.trial = optuna.Trial(study, trial_id)

    def __call__(self, step: int, value: float) -> None:
        if not math.isfinite(value):
            return  # Optuna would reject it; the trial fails on its final value instead
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} (validation {value:.4g})")
