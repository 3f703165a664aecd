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


def is_fresh(run_dir: Path) -> bool:
    """Whether the run directory holds nothing but the empty log Hydra opened for this process."""
    contents = list(run_dir.iterdir()) if run_dir.is_dir() else []
    return all(path.name == "run.log" and path.stat().st_size == 0 for path in contents)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    fresh = is_fresh(run_dir)
    try:
        return pipeline.run(cfg, run_dir)
    except USER_ERRORS as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # let the sweeper record this job as failed
            logging.getLogger("run").error("error: %s", error)
            raise
        if fresh and not (run_dir / ".hydra").exists():  # it failed before the run began: leave nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        fail(error)
    except KeyboardInterrupt:  # outside training (which saves a checkpoint first and exits 130 itself)
        fail("interrupted", status=130)


if __name__ == "__main__":
    try:
        pipeline.check_command_line(sys.argv[1:])
        if distributed.launched():
            sys.argv += distributed.hydra_overrides(sys.argv[1:])
    except (*USER_ERRORS, distributed.LaunchError) as error:
        fail(error)
    except KeyboardInterrupt:
        fail("interrupted", status=130)
    main()
