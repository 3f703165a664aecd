"""Optuna studies driven by Hydra: `python run.py -m hydra/sweeper=optuna`.

The Hydra side (the `Sweeper` plugin) lives in `hydra_plugins/simt_optuna_sweeper`; it hands the work to
`sweep.run_sweep`. A training job learns which trial it is through environment variables that the
sweeper sets for it (`hydra.job.env_set`), so that it can report validation values for pruning even when
it runs in another process or on another machine.
"""
import os

STORAGE_ENV = "SIMT_OPTUNA_STORAGE"
STUDY_ENV = "SIMT_OPTUNA_STUDY"
TRIAL_ID_ENV = "SIMT_OPTUNA_TRIAL_ID"


def trial_reporter():
    """The job side of pruning: a `report(step, value)` callable, or None when not run by the sweeper."""
    if TRIAL_ID_ENV not in os.environ:
        return None
    from simt.sweeping.study import TrialReporter  # optuna is imported only by sweep jobs
    return TrialReporter(os.environ[STORAGE_ENV], os.environ[STUDY_ENV], int(os.environ[TRIAL_ID_ENV]))
