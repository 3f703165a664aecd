"""Conv4: the four-block convolutional backbone of MAML and ProtoNet (as in the official SiMT code).

Block = conv 3x3 (64 ch, padding 1, bias) -> BatchNorm2d -> ReLU -> Dropout(p) if p > 0 -> max-pool 2.
Parameter names (`features.layer{i}.conv`, `features.layer{i}.norm`, `classifier`) follow the official
model's structure, so an official state dict maps onto ours one to one.
"""
from collections import OrderedDict

import torch
from torch import nn


def _block(in_channels: int, out_channels: int, drop_p: float, transductive_bn: bool) -> nn.Sequential:
    layers = OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=True),
        # Transductive BN (MAML family): batch statistics in training *and* test, no running stats.
        norm=nn.BatchNorm2d(out_channels, momentum=1.0, track_running_stats=False)
        if transductive_bn
        else nn.BatchNorm2d(out_channels),
        relu=nn.ReLU(),
    )
    if drop_p > 0:
        layers["dropout"] = nn.Dropout(drop_p)
    layers["pool"] = nn.MaxPool2d(2)
    return nn.Sequential(layers)


class Conv4(nn.Module):
    """Input (N, C, H, W) in [0, 1]; output (N, out_features) logits, or (N, D) embeddings if no head.

    Args:
        in_channels: image channels (1 for kanji, 3 for ImageNet-style data).
        image_size: input side in pixels; fixes the flattened feature size (64 * (H // 16)^2).
        out_features: size of the linear head (ways); None for an embedding network (ProtoNet).
        hidden: channels of every block.
        drop_p: dropout rate after each block's ReLU (SiMT's student perturbation).
        transductive_bn: batch statistics always (MAML family) vs. standard running statistics.
    """

    # Official Conv4 uses a plain nn.BatchNorm2d inside a meta-model: BN's affine parameters are meta-learned
    # but neither adapted in the inner loop nor averaged into the momentum target.
    adapts_norm = False
    folds_tasks = True  # forward: conv, BN, linear and layout-free ops only (simt.models.task_folding)

    def __init__(self, in_channels: int, image_size: int, out_features: int | None, hidden: int = 64,
                 drop_p: float = 0.0, transductive_bn: bool = True):
        super().__init__()
        if image_size < 16:
            raise ValueError(f"backbone conv4: image_size={image_size} is too small; expected >= 16 (4 max-pools)")
        channels = [in_channels, hidden, hidden, hidden, hidden]
        self.features = nn.Sequential(OrderedDict(
            (f"layer{i + 1}", _block(channels[i], channels[i + 1], drop_p, transductive_bn)) for i in range(4)
        ))
        side = image_size
        for _ in range(4):
            side //= 2
        self.feature_dim = hidden * side * side
        self.classifier = nn.Linear(self.feature_dim, out_features) if out_features else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x).flatten(1)
        return self.classifier(features) if self.classifier is not None else features
