"""ConvRegressor: the MAML-family model of the official regression experiments (ShapeNet1D, Pascal1D).

Structure, as the official `models/metamodel/conv_regress.py` (sides for a 128x128x1 input):

    encoder_w   layer1  conv 3x3, 32 ch, stride 2, pad 1, bias -> ReLU [-> Dropout]   128 -> 64
                layer2  conv 3x3, 48 ch, stride 2, pad 1, bias -> ReLU [-> Dropout]    64 -> 32
                pool    max-pool 2                                                     32 -> 16
                layer3  conv 3x3, 64 ch, stride 2, pad 1, bias -> ReLU [-> Dropout]    16 -> 8
                flatten, linear 4096 -> 196 (no activation), reshaped to a 1x14x14 map
    features    layer1..4  conv 3x3, `hidden` (64) ch, stride 1, pad 1, bias -> BN -> ReLU [-> Dropout]
                pool    global average pool -> (N, hidden)
    classifier  linear hidden -> out_features   (Pascal1D: 1 output; ShapeNet1D: 2, then tanh)

Dropout (rate `drop_p`) follows every ReLU, as in the official code, and only exists when drop_p > 0.
BatchNorm is transductive (batch statistics, no running stats) as in the official model, unless
`transductive_bn=False`.

Parameter names equal the official ones except the head, which we call `classifier` (so ANIL adapts
`classifier.*`):

    official (Pascal1D)              official (ShapeNet1D)                   ours
    regressor.{weight,bias}          regressor.regressor.{weight,bias}       classifier.{weight,bias}
    encoder_w.layer{1,2,3}.conv.*, encoder_w.linear.*, features.layer{1..4}.{conv,norm}.*: unchanged.

Differences from the official code: the image side and channels are arguments (official: fixed
128x128x1), so the encoder's linear layer has 64 * s^2 inputs for the encoder's final side s (8 at 128);
the encoded map keeps the official single channel at 14x14. The official model's BN is a plain
`nn.BatchNorm2d` that its inner loop never adapts (only the conv/linear weights are); that choice belongs
to the learner, not to this module.
"""
from collections import OrderedDict

import torch
from torch import nn

ENCODER_WIDTHS = (32, 48, 64)  # official encoder_w channels
MAP_SIDE = 14  # official dim_w = 196 = 14 x 14: the encoder's output map, one channel
OUTPUT_ACTIVATIONS = ("none", "tanh")


def _conv_out(side: int) -> int:
    """Side after a 3x3 conv with stride 2 and padding 1."""
    return (side - 1) // 2 + 1


def _block(in_channels: int, out_channels: int, stride: int, drop_p: float, norm: nn.Module | None) -> nn.Sequential:
    layers = OrderedDict(conv=nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=True))
    if norm is not None:
        layers["norm"] = norm
    layers["relu"] = nn.ReLU()
    if drop_p > 0:
        layers["dropout"] = nn.Dropout(drop_p)
    return nn.Sequential(layers)


class ConvRegressor(nn.Module):
    """Input (N, C, H, W) in [0, 1] (official: 128x128x1); output (N, out_features) predictions.

    Args:
        in_channels: image channels (1 for ShapeNet1D / Pascal1D).
        image_size: input side in pixels (128 in the paper); fixes the encoder's linear input size.
        out_features: number of regression outputs (ShapeNet1D 2 = (cos, sin); Pascal1D 1). Required.
        hidden: channels of the four feature blocks (official 64).
        drop_p: dropout rate after every ReLU (SiMT's student perturbation).
        transductive_bn: batch statistics always (official) vs. standard running statistics.
        output_activation: "tanh" bounds the outputs to [-1, 1] (official ShapeNet1D); "none" (Pascal1D).
    """

    adapts_norm = False  # plain BatchNorm, as Conv4: meta-learned, never adapted or averaged

    def __init__(self, in_channels: int, image_size: int, out_features: int | None, hidden: int = 64,
                 drop_p: float = 0.0, transductive_bn: bool = True, output_activation: str = "none"):
        super().__init__()
        if out_features is None or out_features < 1:
            raise ValueError(f"backbone conv_regressor: out_features={out_features}; expected >= 1 (number of "
                             f"regression outputs); it has no embedding-only (ProtoNet) form")
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"backbone conv_regressor: output_activation={output_activation!r}; expected one of "
                             f"{', '.join(OUTPUT_ACTIVATIONS)}")
        if in_channels < 1:
            raise ValueError(f"backbone conv_regressor: in_channels={in_channels}; expected >= 1")
        if hidden < 1:
            raise ValueError(f"backbone conv_regressor: hidden={hidden}; expected >= 1")
        if not 0.0 <= drop_p < 1.0:
            raise ValueError(f"backbone conv_regressor: drop_p={drop_p}; expected 0 <= drop_p < 1")
        side = _conv_out(_conv_out(_conv_out(image_size)) // 2)  # stride-2 conv, stride-2 conv, pool, stride-2 conv
        if side < 1:
            raise ValueError(f"backbone conv_regressor: image_size={image_size} is too small; expected >= 5 "
                             f"(the encoder halves the side 4 times)")
        self.encoded_dim = ENCODER_WIDTHS[-1] * side * side  # 4096 at 128x128

        c1, c2, c3 = ENCODER_WIDTHS
        self.encoder_w = nn.Sequential(OrderedDict(
            layer1=_block(in_channels, c1, 2, drop_p, None),
            layer2=_block(c1, c2, 2, drop_p, None),
            pool=nn.MaxPool2d(2),
            layer3=_block(c2, c3, 2, drop_p, None),
            flatten=nn.Flatten(),
            linear=nn.Linear(self.encoded_dim, MAP_SIDE * MAP_SIDE),
        ))

        def norm() -> nn.BatchNorm2d:
            if transductive_bn:  # official: batch statistics in training *and* test, no running stats
                return nn.BatchNorm2d(hidden, momentum=1.0, track_running_stats=False)
            return nn.BatchNorm2d(hidden)

        channels = [1, hidden, hidden, hidden, hidden]  # the encoded map has one channel
        self.features = nn.Sequential(OrderedDict(
            [(f"layer{i + 1}", _block(channels[i], channels[i + 1], 1, drop_p, norm())) for i in range(4)]
            + [("pool", nn.AdaptiveAvgPool2d(1))]
        ))
        self.feature_dim = hidden
        self.classifier = nn.Linear(hidden, out_features)
        self.output_activation = nn.Tanh() if output_activation == "tanh" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoded = self.encoder_w(x).view(-1, 1, MAP_SIDE, MAP_SIDE)  # (N, 1, 14, 14)
        features = self.features(encoded).flatten(1)  # (N, hidden)
        return self.output_activation(self.classifier(features))
