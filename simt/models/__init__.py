"""Backbones: plain nn.Modules, driven functionally through torch.func.functional_call."""
from torch import nn

from simt.models.conv4 import Conv4
from simt.models.conv_regressor import ConvRegressor
from simt.models.resnet12 import ResNet12


def set_dropout(model: nn.Module, active: bool) -> None:
    """Switch only the dropout layers on or off, leaving BatchNorm's mode alone.

    SiMT perturbs the student with dropout in exactly one forward pass (the query pass of the outer
    loss); everything else runs with dropout off while BatchNorm keeps its own mode.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.train(active)


__all__ = ["Conv4", "ConvRegressor", "ResNet12", "set_dropout"]
