"""SiMT: Meta-Learning with Self-Improving Momentum Target (Tack et al., NeurIPS 2022) on current PyTorch."""
