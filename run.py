"""Train and evaluate one configuration (or, with -m, a sweep).

    python run.py algo=maml simt.eta=0.995
    python run.py -m algo=maml,anil simt.enabled=true,false
    torchrun --nproc_per_node=2 run.py task.meta_batch_size=8   # the meta-batch's tasks split over 2 GPUs
"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from simt import distributed, pipeline

# Errors whose message is one complete line naming the key or file and what was expected.
USER_ERRORS = (pipeline.ConfigError, pipeline.OverrideError, pipeline.CheckpointError, pipeline.DataError,
               pipeline.BuildError, pipeline.NonFiniteError)


def fail(error: Exception) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return pipeline.run(cfg, HydraConfig.get().runtime.output_dir)
    except USER_ERRORS as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # let the sweeper record this job as failed
            logging.getLogger("run").error("error: %s", error)
            raise
        fail(error)


if __name__ == "__main__":
    try:
        pipeline.check_overrides(sys.argv[1:])
        if distributed.launched():
            sys.argv += distributed.hydra_overrides(sys.argv[1:])
    except (*USER_ERRORS, distributed.LaunchError) as error:
        fail(error)
    main()
