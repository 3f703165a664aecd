"""SiMT: Meta-Learning with Self-Improving Momentum Target (Tack et al., NeurIPS 2022) on current PyTorch."""
from omegaconf import OmegaConf

# `${min:500,${trainer.eval_tasks}}` in conf/trainer: registered on import of simt, which every entry point
# does, and which Hydra's start-up does for a bare compose (hydra_plugins/simt_optuna_sweeper imports it).
OmegaConf.register_new_resolver("min", lambda *values: min(values), replace=True)
