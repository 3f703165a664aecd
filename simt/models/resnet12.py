"""ResNet-12: the deeper backbone of the paper's tables, in its two official flavours.

Both flavours stack four residual blocks. One block (input C_in, width C):

    x -> conv3x3(C, no bias) -> BN -> LeakyReLU
      -> conv3x3(C, no bias) -> BN -> LeakyReLU
      -> conv3x3(C, no bias) -> BN                     (no activation before the add)
      + shortcut(x) = conv1x1(C, stride 1, no bias) -> BN
      -> LeakyReLU -> max-pool 2 (with dropout p next to the pool, see below)

Each block halves the side (floor): 84 -> 42 -> 21 -> 10 -> 5; every 3x3 conv keeps the side (padding 1).

The flavour follows from `out_features` (the official code has one class per flavour):

* **Meta-model** (MAML, FOMAML, ANIL, MetaSGD; `out_features` = ways), as the official
  `models/metamodel/resnet12.py`: widths 64-128-256-512; LeakyReLU with PyTorch's default slope 0.01
  (the official meta-model calls `nn.LeakyReLU()`; MetaOptNet's 0.1 is used only by the ProtoNet
  flavour); dropout *before* each block's max-pool; global average pool to 512 features; dropout;
  linear head `classifier`. Xavier-uniform initialisation of every conv and linear weight.
* **Embedding network** (ProtoNet; `out_features=None`), as the official
  `models/protonet_model/resnet12.py`: widths 64-160-320-640; LeakyReLU(0.1); dropout *after* each
  block's max-pool; average pool to a 640-d embedding; no head. Kaiming-normal (fan-out, leaky-ReLU)
  initialisation of every conv weight.

Where we differ from the official code (the README's fidelity table lists these):

* ProtoNet flavour, dropout: the official block only drops when a `dropout_train` flag is set, and
  nothing ever sets it, so its dropout never runs; its intended dropout is element-wise in blocks 1-2
  and a scheduled DropBlock (block size 5) in blocks 3-4. Ours is a plain `nn.Dropout(drop_p)` after
  every block that really runs when `drop_p > 0` (and that `simt.models.set_dropout` toggles).
* ProtoNet flavour, pooling: the official code uses `AvgPool2d(5, stride=1)`, which equals a global
  average pool on its 5x5 final map at 84x84 but breaks or yields more than 640 features at other
  sizes; ours is a global average pool (identical at 84x84, 640-d at every size).
* Input channels: the official code hard-codes 3; ours takes `in_channels`.
* Transductive BN: `BatchNorm2d(momentum=1, track_running_stats=False)` as in our Conv4; the official
  meta-model's BN has momentum 0.1, which is unused without running statistics (same behaviour).

Parameter names equal the official ones, so an official state dict loads with no renaming:

    layer{1..4}.0.conv{1,2,3}.weight              (C, C_in or C, 3, 3)
    layer{1..4}.0.bn{1,2,3}.{weight,bias}         (C,)
    layer{1..4}.0.downsample.0.weight             (C, C_in, 1, 1)   the shortcut conv
    layer{1..4}.0.downsample.1.{weight,bias}      (C,)              the shortcut BN
    classifier.{weight,bias}                      (ways, 512), (ways,)   meta-model only

plus, with standard BN, the buffers `running_mean`, `running_var`, `num_batches_tracked` of each BN.
"""
from collections.abc import Sequence

import torch
from torch import nn

META_WIDTHS = (64, 128, 256, 512)  # official meta-model (MAML family)
PROTO_WIDTHS = (64, 160, 320, 640)  # official ProtoNet embedding network
META_SLOPE = 0.01  # official meta-model: nn.LeakyReLU() with its default slope
PROTO_SLOPE = 0.1  # official ProtoNet network: nn.LeakyReLU(0.1)
MIN_IMAGE_SIZE = 16  # four halvings must leave at least a 1x1 map


def _batch_norm(channels: int, transductive_bn: bool) -> nn.BatchNorm2d:
    if transductive_bn:  # MAML family: batch statistics in training *and* test, no running stats
        return nn.BatchNorm2d(channels, momentum=1.0, track_running_stats=False)
    return nn.BatchNorm2d(channels)


class ResidualBlock(nn.Module):
    """Three 3x3 conv-BN stages plus a 1x1 conv-BN shortcut, then LeakyReLU, max-pool 2 and dropout.

    `dropout_before_pool` picks the official meta-model's order (dropout, then pool) or the official
    ProtoNet network's (pool, then dropout); the two are not equivalent.
    Input (N, C_in, H, W); output (N, C, H // 2, W // 2).
    """

    def __init__(self, in_channels: int, channels: int, negative_slope: float, drop_p: float,
                 transductive_bn: bool, dropout_before_pool: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = _batch_norm(channels, transductive_bn)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = _batch_norm(channels, transductive_bn)
        self.conv3 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn3 = _batch_norm(channels, transductive_bn)
        # Named and ordered as the official `downsample` Sequential: index 0 = conv, 1 = BN.
        self.downsample = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=1, bias=False),
            _batch_norm(channels, transductive_bn),
        )
        self.relu = nn.LeakyReLU(negative_slope)
        self.dropout = nn.Dropout(drop_p) if drop_p > 0 else None
        self.dropout_before_pool = dropout_before_pool
        self.maxpool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.relu(out + self.downsample(x))
        if self.dropout is not None and self.dropout_before_pool:
            out = self.dropout(out)
        out = self.maxpool(out)
        if self.dropout is not None and not self.dropout_before_pool:
            out = self.dropout(out)
        return out


class ResNet12(nn.Module):
    """Input (N, C, H, W) in [0, 1]; output (N, out_features) logits, or (N, widths[-1]) embeddings.

    Args:
        in_channels: image channels (3 for the ImageNet-style data sets).
        image_size: input side in pixels; at least 16 (four max-pools).
        out_features: size of the linear head (ways) for the MAML family; None for ProtoNet's
            embedding network. It also selects the official flavour (see the module docstring).
        widths: channels of the four blocks; None picks 64-128-256-512 (head) or 64-160-320-640
            (embedding network), as the official code does.
        drop_p: dropout rate of every block (and, with a head, of the features before it).
        embedding_dropout: False keeps the embedding (ProtoNet) variant free of dropout whatever drop_p says,
            as the official ProtoNet ResNet-12, whose dropout flag is never set.
        transductive_bn: batch statistics always (MAML family) vs. standard running statistics.
        negative_slope: LeakyReLU slope; None picks the official one (0.01 with a head, 0.1 without).
    """

    # The official MAML-family ResNet-12 uses meta-BatchNorm: its affine parameters are adapted in the
    # inner loop and averaged into the momentum target like every other weight.
    adapts_norm = True
    folds_tasks = True  # forward: conv, BN, linear and layout-free ops only (simt.models.task_folding)

    def __init__(self, in_channels: int, image_size: int, out_features: int | None,
                 widths: Sequence[int] | None = None, drop_p: float = 0.0, transductive_bn: bool = True,
                 negative_slope: float | None = None, embedding_dropout: bool = True):
        super().__init__()
        embedding = out_features is None
        if embedding and not embedding_dropout:  # the official ProtoNet network's dropout never turns on
            drop_p = 0.0
        widths = tuple(PROTO_WIDTHS if embedding else META_WIDTHS) if widths is None else tuple(widths)
        negative_slope = (PROTO_SLOPE if embedding else META_SLOPE) if negative_slope is None else negative_slope
        if in_channels < 1:
            raise ValueError(f"backbone resnet12: in_channels={in_channels}; expected >= 1")
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"backbone resnet12: image_size={image_size} is too small; "
                             f"expected >= {MIN_IMAGE_SIZE} (4 max-pools)")
        if out_features is not None and out_features < 1:
            raise ValueError(f"backbone resnet12: out_features={out_features}; expected >= 1 (ways) or None "
                             f"(embedding network)")
        if len(widths) != 4 or any(int(w) != w or w < 1 for w in widths):
            raise ValueError(f"backbone resnet12: widths={list(widths)}; expected 4 positive integers or None")
        if not 0.0 <= drop_p < 1.0:
            raise ValueError(f"backbone resnet12: drop_p={drop_p}; expected 0 <= drop_p < 1")
        if negative_slope < 0:
            raise ValueError(f"backbone resnet12: negative_slope={negative_slope}; expected >= 0 or None")

        channels = [in_channels, *widths]
        for i in range(4):
            block = ResidualBlock(channels[i], channels[i + 1], negative_slope, drop_p, transductive_bn,
                                  dropout_before_pool=not embedding)
            # One block per stage inside a Sequential gives the official names `layer{i}.0.*`.
            self.add_module(f"layer{i + 1}", nn.Sequential(block))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[-1]
        if embedding:
            self.dropout = None
            self.classifier = None
        else:
            self.dropout = nn.Dropout(drop_p) if drop_p > 0 else None  # official: dropout before the head
            self.classifier = nn.Linear(self.feature_dim, out_features)
        self._init_official(embedding)

    def _init_official(self, embedding: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                if embedding:
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
                else:
                    nn.init.xavier_uniform_(module.weight)
            elif isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)  # bias keeps PyTorch's default, as the official code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        features = self.avgpool(x).flatten(1)  # (N, widths[-1])
        if self.classifier is None:
            return features
        if self.dropout is not None:
            features = self.dropout(features)
        return self.classifier(features)
