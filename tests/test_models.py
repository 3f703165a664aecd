"""Backbone structure: the official Conv4's state dict must map onto ours one to one."""
import pytest
import torch

from simt.models import Conv4, set_dropout


def _official_conv4_shapes(in_channels: int, ways: int | None, feature_dim: int) -> dict[str, tuple]:
    """Parameter names and shapes of the official MAML-family Conv4 (4 conv blocks + linear head)."""
    shapes = {}
    channels = [in_channels, 64, 64, 64, 64]
    for i in range(4):
        shapes[f"features.layer{i + 1}.conv.weight"] = (64, channels[i], 3, 3)
        shapes[f"features.layer{i + 1}.conv.bias"] = (64,)
        shapes[f"features.layer{i + 1}.norm.weight"] = (64,)
        shapes[f"features.layer{i + 1}.norm.bias"] = (64,)
    if ways:
        shapes["classifier.weight"] = (ways, feature_dim)
        shapes["classifier.bias"] = (ways,)
    return shapes


@pytest.mark.parametrize("in_channels,size,feature_dim", [(3, 84, 1600), (1, 28, 64)])
def test_conv4_parameters_match_the_official_layout(in_channels, size, feature_dim):
    model = Conv4(in_channels, size, out_features=5)
    assert {k: tuple(v.shape) for k, v in model.named_parameters()} == \
        _official_conv4_shapes(in_channels, 5, feature_dim)
    assert model(torch.rand(2, in_channels, size, size)).shape == (2, 5)


def test_transductive_bn_keeps_no_running_stats_and_protonet_bn_does():
    assert not list(Conv4(1, 28, 5, transductive_bn=True).buffers())
    embedding = Conv4(1, 28, None, transductive_bn=False)
    assert {name.rsplit(".", 1)[-1] for name, _ in embedding.named_buffers()} == \
        {"running_mean", "running_var", "num_batches_tracked"}
    assert embedding(torch.rand(3, 1, 28, 28)).shape == (3, 64)


def test_dropout_sits_after_relu_and_only_when_p_positive():
    assert not any(isinstance(m, torch.nn.Dropout) for m in Conv4(1, 28, 5).modules())
    block = Conv4(1, 28, 5, drop_p=0.3).features.layer1
    assert list(block._modules) == ["conv", "norm", "relu", "dropout", "pool"]


def test_set_dropout_toggles_only_dropout_layers():
    model = Conv4(1, 28, 5, drop_p=0.5).train()
    set_dropout(model, False)
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    set_dropout(model, True)
    x = torch.rand(4, 1, 28, 28)
    assert not torch.equal(model(x), model(x))  # dropout active: two passes differ


def test_too_small_images_are_rejected():
    with pytest.raises(ValueError, match="image_size=8 is too small"):
        Conv4(1, 8, 5)
