"""Meta-SGD (Li et al., 2017): MAML whose inner step sizes are meta-learned too.

The rates live in θ under the prefix `inner_lr.`, so the outer Adam trains them and SiMT averages them
(the teacher adapts with the momentum rates, as the official code does).
"""
import torch

from simt.algorithms.inner_loop import Params
from simt.algorithms.maml import GradientLearner

LR_PREFIX = "inner_lr."
LR_SHAPES = ("element", "tensor")


class MetaSGD(GradientLearner):
    """Args as GradientLearner, plus `lr_shape`: one rate per parameter element (the paper) or one per
    tensor (what the official SiMT code does)."""

    def __init__(self, model, lr_shape: str = "element", **kwargs):
        super().__init__(model, **kwargs)
        if lr_shape not in LR_SHAPES:
            raise ValueError(f"algo.lr_shape={lr_shape!r}: expected one of {', '.join(LR_SHAPES)}")
        params = dict(model.named_parameters())
        shape_of = (lambda p: p.shape) if lr_shape == "element" else (lambda p: ())
        self.inner_lrs = {key: torch.full(shape_of(params[key]), float(self.inner_lr), device=params[key].device,
                                          dtype=params[key].dtype, requires_grad=True) for key in self.adapt_keys}

    def meta_parameters(self) -> Params:
        return {**super().meta_parameters(), **{LR_PREFIX + k: v for k, v in self.inner_lrs.items()}}

    def inner_lrs_of(self, params: Params) -> Params:
        return {key: params[LR_PREFIX + key] for key in self.adapt_keys}

    def _forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return super()._forward({k: v for k, v in params.items() if not k.startswith(LR_PREFIX)}, x)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "inner_lrs": {k: v.detach().clone() for k, v in self.inner_lrs.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for key, value in state["inner_lrs"].items():
                self.inner_lrs[key].copy_(value)
