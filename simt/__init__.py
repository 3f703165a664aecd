"""SiMT: Meta-Learning with Self-Improving Momentum Target (Tack et al., NeurIPS 2022) on current PyTorch."""
from omegaconf import OmegaConf

# `${min:500,${trainer.eval_tasks}}` in conf/trainer: registered on import, so before any entry point
# (run.py, the sweepers, reproduce, the tests) composes a config.
OmegaConf.register_new_resolver("min", lambda *values: min(values), replace=True)
