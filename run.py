"""Train and evaluate one configuration (or, with -m, a sweep).

    python run.py algo=maml simt.eta=0.995
    python run.py -m hydra/sweeper=optuna
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from simt import pipeline


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return pipeline.run(cfg, HydraConfig.get().runtime.output_dir)
    except (pipeline.ConfigError, pipeline.NonFiniteLossError, FileNotFoundError) as error:
        # One line, no traceback: the message names the key or file and what was expected.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    try:
        pipeline.check_group_overrides(sys.argv[1:])
    except pipeline.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main()
