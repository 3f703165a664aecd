"""`hydra/sweeper=optuna`: the project's Hydra sweeper on a current Optuna (see simt/sweeping).

Hydra imports every module under `hydra_plugins` at start-up, so this one stays light: it registers the
config node and defers Optuna and the sweep loop to the first `sweep` call.
"""
from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper

import simt  # noqa: F401  (light: registers the config resolvers, so that any compose of conf/ resolves)


@dataclass
class OptunaSweeperConf:
    """Every key left null is taken from the named sweep file (sweeps/<sweep>.yaml), then the defaults."""
    _target_: str = "hydra_plugins.simt_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    sweep: str = "simt"                # a file in sweeps/ (without .yaml), or a path to a YAML file
    n_trials: Optional[int] = None     # trials the study should hold; a resumed study counts its finished ones
    n_jobs: Optional[int] = None       # trials launched at once (default: hydra.launcher.n_jobs, else 1)
    storage: Optional[str] = None      # sqlite:///PATH (default studies/optuna.db), postgresql://..., journal:PATH
    study_name: Optional[str] = None   # default: the sweep's name plus the fixed overrides
    direction: Optional[str] = None    # auto (from the data set's metric) | maximize | minimize
    sampler: Any = None                # tpe | random | grid | cmaes | qmc, or {name: tpe, seed: 0, ...}
    pruner: Any = None                 # median | percentile | hyperband | successive_halving | threshold | none


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="simt")


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config = self.hydra_context = self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        from simt.sweeping.sweep import run_sweep
        return run_sweep(self, arguments)
