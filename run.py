"""Train and evaluate one configuration (or, with -m, a sweep).

    python run.py algo=maml simt.eta=0.995
    python run.py -m algo=maml,anil simt.enabled=true,false
    torchrun --nproc_per_node=2 run.py task.meta_batch_size=8   # the meta-batch's tasks split over 2 GPUs
"""
import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from simt import distributed, pipeline

# Errors whose message is one complete line naming the key or file and what was expected.
USER_ERRORS = (pipeline.ConfigError, pipeline.OverrideError, pipeline.CheckpointError, pipeline.DataError,
               pipeline.BuildError, pipeline.NonFiniteError)


def fail(error: Exception | str, status: int = 2) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(status)


# Whether this process makes its run directory: the command line's run directory did not exist when it was
# checked (set in __main__; a directory that resolves only inside Hydra counts as not made here).
MAKES_RUN_DIR = False
STARTING_FILES = {"run.lock", "run.log", ".hydra"}  # what a run writes before it trains or tests anything


def discard_unused(run_dir: Path) -> None:
    """Remove a run directory this process made, if the run failed before writing anything but its start."""
    if MAKES_RUN_DIR and run_dir.is_dir() and {path.name for path in run_dir.iterdir()} <= STARTING_FILES:
        shutil.rmtree(run_dir, ignore_errors=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return pipeline.run(cfg, run_dir)
    except USER_ERRORS as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # let the sweeper record this job as failed
            logging.getLogger("run").error("error: %s", error)
            raise
        discard_unused(run_dir)  # a config error found late (e.g. on reading the data) leaves nothing behind
        fail(error)
    except KeyboardInterrupt:  # outside training (which saves a checkpoint first and exits 130 itself)
        fail("interrupted", status=130)


if __name__ == "__main__":
    try:
        checked_dir = pipeline.check_command_line(sys.argv[1:])
        MAKES_RUN_DIR = checked_dir is not None and not Path(checked_dir).exists()
        if distributed.launched():
            sys.argv += distributed.hydra_overrides(sys.argv[1:])
    except (*USER_ERRORS, distributed.LaunchError) as error:
        fail(error)
    except KeyboardInterrupt:
        fail("interrupted", status=130)
    main()
