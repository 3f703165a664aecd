"""ResNet-12 and the conv regressor: shapes, the official parameter layout, BN modes, dropout, and
functional (second-order) use. Small images and batches keep the file fast on two CPU cores."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from simt.models import set_dropout
from simt.models.conv_regressor import ConvRegressor
from simt.models.resnet12 import ResNet12


# --- the official layouts, written out from models/metamodel/resnet12.py, models/protonet_model/resnet12.py
# --- and models/metamodel/conv_regress.py of the official SiMT code

def _official_resnet_block(i: int, c_in: int, c: int) -> dict[str, tuple]:
    """One official BasicBlock, stage i: three bias-free 3x3 convs with BN, a 1x1 conv + BN shortcut."""
    p = f"layer{i}.0."
    return {
        p + "conv1.weight": (c, c_in, 3, 3), p + "bn1.weight": (c,), p + "bn1.bias": (c,),
        p + "conv2.weight": (c, c, 3, 3), p + "bn2.weight": (c,), p + "bn2.bias": (c,),
        p + "conv3.weight": (c, c, 3, 3), p + "bn3.weight": (c,), p + "bn3.bias": (c,),
        p + "downsample.0.weight": (c, c_in, 1, 1),
        p + "downsample.1.weight": (c,), p + "downsample.1.bias": (c,),
    }


OFFICIAL_META_RESNET12 = {  # ResNet12(num_classes=5): widths 64-128-256-512, avg-pool, linear head
    **_official_resnet_block(1, 3, 64), **_official_resnet_block(2, 64, 128),
    **_official_resnet_block(3, 128, 256), **_official_resnet_block(4, 256, 512),
    "classifier.weight": (5, 512), "classifier.bias": (5,),
}
OFFICIAL_PROTO_RESNET12 = {  # ResNetProto12(): widths 64-160-320-640, no head
    **_official_resnet_block(1, 3, 64), **_official_resnet_block(2, 64, 160),
    **_official_resnet_block(3, 160, 320), **_official_resnet_block(4, 320, 640),
}
OFFICIAL_CONV_REGRESSOR = {  # ConvRegressor(dataset='pose'|'shapenet'), head renamed to `classifier`
    "encoder_w.layer1.conv.weight": (32, 1, 3, 3), "encoder_w.layer1.conv.bias": (32,),
    "encoder_w.layer2.conv.weight": (48, 32, 3, 3), "encoder_w.layer2.conv.bias": (48,),
    "encoder_w.layer3.conv.weight": (64, 48, 3, 3), "encoder_w.layer3.conv.bias": (64,),
    "encoder_w.linear.weight": (196, 4096), "encoder_w.linear.bias": (196,),
    "features.layer1.conv.weight": (64, 1, 3, 3), "features.layer1.conv.bias": (64,),
    "features.layer1.norm.weight": (64,), "features.layer1.norm.bias": (64,),
    **{name: shape for i in (2, 3, 4) for name, shape in {
        f"features.layer{i}.conv.weight": (64, 64, 3, 3), f"features.layer{i}.conv.bias": (64,),
        f"features.layer{i}.norm.weight": (64,), f"features.layer{i}.norm.bias": (64,)}.items()},
}


def _shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


SMALL = (4, 4, 8, 8)  # narrow widths where a test is about behaviour, not the official layout


def _meta(drop_p=0.0, size=16, widths=SMALL, transductive_bn=True, **kw):
    return ResNet12(3, size, out_features=5, widths=widths, drop_p=drop_p, transductive_bn=transductive_bn, **kw)


def _proto(drop_p=0.0, size=16, widths=SMALL, transductive_bn=False, **kw):
    return ResNet12(3, size, out_features=None, widths=widths, drop_p=drop_p, transductive_bn=transductive_bn, **kw)


def _regressor(drop_p=0.0, size=32, outputs=2, hidden=8, transductive_bn=True, **kw):
    return ConvRegressor(1, size, out_features=outputs, hidden=hidden, drop_p=drop_p,
                         transductive_bn=transductive_bn, **kw)


# --- layout and shapes

def test_meta_resnet12_matches_the_official_layout_and_shapes_at_84():
    model = ResNet12(3, 84, out_features=5, transductive_bn=True)
    assert _shapes(model) == OFFICIAL_META_RESNET12
    assert sum(p.numel() for p in model.parameters()) == 7_999_365
    assert model(torch.rand(2, 3, 84, 84)).shape == (2, 5)


def test_proto_resnet12_matches_the_official_layout_and_gives_640d_embeddings_at_84():
    model = ResNet12(3, 84, out_features=None, transductive_bn=False).eval()
    assert _shapes(model) == OFFICIAL_PROTO_RESNET12
    assert sum(p.numel() for p in model.parameters()) == 12_424_320
    assert model(torch.rand(1, 3, 84, 84)).shape == (1, 640)


def test_conv_regressor_matches_the_official_layout_at_128():
    shapenet = ConvRegressor(1, 128, out_features=2, output_activation="tanh")
    assert _shapes(shapenet) == {**OFFICIAL_CONV_REGRESSOR, "classifier.weight": (2, 64), "classifier.bias": (2,)}
    pascal = ConvRegressor(1, 128, out_features=1)
    assert _shapes(pascal) == {**OFFICIAL_CONV_REGRESSOR, "classifier.weight": (1, 64), "classifier.bias": (1,)}
    assert sum(p.numel() for p in pascal.parameters()) == 956_917
    assert shapenet(torch.rand(2, 1, 128, 128)).shape == (2, 2)
    assert pascal(torch.rand(2, 1, 128, 128)).shape == (2, 1)


@pytest.mark.parametrize("size,side", [(16, 1), (32, 2), (40, 2)])
def test_resnet12_pools_globally_at_any_size(size, side):
    assert ResNet12(3, size, 5)(torch.rand(2, 3, size, size)).shape == (2, 5)
    proto = ResNet12(3, size, None, transductive_bn=False).eval()
    assert proto(torch.rand(1, 3, size, size)).shape == (1, 640)
    assert ResNet12(1, size, 4, widths=(8, 8, 16, 16))(torch.rand(2, 1, size, size)).shape == (2, 4)
    assert proto.layer4(proto.layer3(proto.layer2(proto.layer1(torch.rand(1, 3, size, size))))).shape[-1] == side


def test_widths_are_chosen_from_the_flavour_unless_given():
    meta, proto = ResNet12(3, 16, 5), ResNet12(3, 16, None, transductive_bn=False)
    assert meta.feature_dim == 512 and proto.feature_dim == 640
    assert meta.layer2[0].conv1.out_channels == 128 and proto.layer2[0].conv1.out_channels == 160
    model = ResNet12(3, 16, None, widths=(8, 16, 24, 32), transductive_bn=False)
    assert model.feature_dim == 32 and model.classifier is None
    assert meta.layer1[0].relu.negative_slope == 0.01  # official meta-model: nn.LeakyReLU()
    assert proto.layer1[0].relu.negative_slope == 0.1  # official ProtoNet network: nn.LeakyReLU(0.1)
    assert ResNet12(3, 16, 5, negative_slope=0.1).layer1[0].relu.negative_slope == 0.1


@pytest.mark.parametrize("size", [5, 32, 128])
def test_conv_regressor_accepts_other_sizes(size):
    assert _regressor(size=size)(torch.rand(3, 1, size, size)).shape == (3, 2)


# --- BatchNorm modes

def test_transductive_bn_has_no_buffers_and_standard_bn_has_running_stats():
    assert not list(_meta().buffers())
    assert not list(_regressor().buffers())
    for model in (_proto(), ResNet12(3, 16, 5, transductive_bn=False), _regressor(transductive_bn=False)):
        kinds = {name.rsplit(".", 1)[-1] for name, _ in model.named_buffers()}
        assert kinds == {"running_mean", "running_var", "num_batches_tracked"}
    assert {name for name, _ in _proto().named_buffers() if name.startswith("layer1.0.bn1.")} == \
        {"layer1.0.bn1.running_mean", "layer1.0.bn1.running_var", "layer1.0.bn1.num_batches_tracked"}


def test_transductive_bn_uses_batch_statistics_even_in_eval_mode():
    model = _meta().eval()
    x = torch.rand(4, 3, 16, 16)
    # Batch statistics: a sample's output depends on the other samples of the batch.
    assert not torch.allclose(model(x)[:2], model(x[:2]))


# --- dropout

def _dropouts(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]


def test_dropout_layers_exist_only_when_p_positive():
    assert len(_dropouts(_meta(0.2))) == 5  # after each block + before the head
    assert len(_dropouts(_proto(0.2))) == 4  # after each block (the official one never runs)
    assert len(_dropouts(_regressor(0.2))) == 7  # after every ReLU: 3 encoder + 4 feature blocks
    for model in (_meta(), _proto(), _regressor()):
        assert not _dropouts(model)


@pytest.mark.parametrize("make,size,eval_mode", [(_meta, 16, False), (_proto, 16, True), (_regressor, 32, False)])
def test_set_dropout_changes_outputs_only_when_p_positive(make, size, eval_mode):
    channels = 1 if make is _regressor else 3
    x = torch.rand(4, channels, size, size)
    for drop_p, changes in ((0.5, True), (0.0, False)):
        torch.manual_seed(0)
        model = make(drop_p, size=size)
        model.eval() if eval_mode else model.train()  # ProtoNet: running-stat BN, dropout still switchable
        set_dropout(model, False)
        off = model(x)
        assert torch.equal(off, model(x))
        set_dropout(model, True)
        on = model(x)
        assert (not torch.allclose(on, off)) is changes
        set_dropout(model, False)
        assert torch.equal(model(x), off)


# --- functional use

@pytest.mark.parametrize("make,size", [(_meta, 16), (_proto, 16), (_regressor, 32)])
def test_functional_call_with_a_params_dict_equals_forward(make, size):
    torch.manual_seed(0)
    model = make(size=size).eval()
    channels = 1 if make is _regressor else 3
    x = torch.rand(3, channels, size, size)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.testing.assert_close(functional_call(model, params, (x,)), model(x))
    # and the params dict really is what is used
    params = {name: p + 0.1 for name, p in params.items()}
    assert not torch.allclose(functional_call(model, params, (x,)), model(x))


@pytest.mark.parametrize("make,size", [(_meta, 16), (_proto, 16), (_regressor, 16)])
def test_second_order_gradients_flow_through_the_backbone(make, size):
    torch.manual_seed(0)
    model = make(size=size).train()
    channels = 1 if make is _regressor else 3
    support, query = torch.rand(4, channels, size, size), torch.rand(4, channels, size, size)
    params = dict(model.named_parameters())

    def loss(p, x):
        out = functional_call(model, p, (x,))
        if make is _proto:  # embedding network: a prototype-style loss on the embeddings
            return (out[:2].mean(0) - out[2:]).pow(2).sum()
        if make is _regressor:
            return out.pow(2).mean()
        return F.cross_entropy(out, torch.tensor([0, 1, 2, 3]))

    grads = torch.autograd.grad(loss(params, support), list(params.values()), create_graph=True)
    adapted = {name: p - 0.1 * g for (name, p), g in zip(params.items(), grads)}
    meta_grads = torch.autograd.grad(loss(adapted, query), list(params.values()))
    assert all(torch.isfinite(g).all() for g in meta_grads)
    # A genuinely second-order term: the gradient of the inner gradient's norm is non-zero.
    grads = torch.autograd.grad(loss(params, support), list(params.values()), create_graph=True)
    hessian_terms = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), list(params.values()))
    assert any(h.abs().sum() > 0 for h in hessian_terms)


# --- regression head

def test_tanh_bounds_the_regressor_outputs():
    torch.manual_seed(0)
    bounded, free = _regressor(output_activation="tanh"), _regressor(output_activation="none")
    for model in (bounded, free):
        with torch.no_grad():
            model.classifier.weight.fill_(100.0)
            model.classifier.bias.fill_(50.0)
    x = torch.rand(4, 1, 32, 32)
    assert bounded(x).abs().max() <= 1.0
    assert free(x).abs().max() > 1.0


# --- impossible configurations

@pytest.mark.parametrize("kwargs,message", [
    (dict(in_channels=3, image_size=15, out_features=5), "image_size=15 is too small; expected >= 16"),
    (dict(in_channels=0, image_size=84, out_features=5), "in_channels=0; expected >= 1"),
    (dict(in_channels=3, image_size=84, out_features=0), "out_features=0; expected >= 1"),
    (dict(in_channels=3, image_size=84, out_features=5, widths=(64, 128)), "widths=\\[64, 128\\]; expected 4"),
    (dict(in_channels=3, image_size=84, out_features=5, drop_p=1.0), "drop_p=1.0; expected 0 <= drop_p < 1"),
])
def test_resnet12_rejects_impossible_configurations(kwargs, message):
    with pytest.raises(ValueError, match=f"backbone resnet12: {message}"):
        ResNet12(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(out_features=None), "out_features=None; expected >= 1"),
    (dict(out_features=2, output_activation="sigmoid"), "output_activation='sigmoid'; expected one of none, tanh"),
    (dict(out_features=2, image_size=4), "image_size=4 is too small; expected >= 5"),
    (dict(out_features=2, hidden=0), "hidden=0; expected >= 1"),
    (dict(out_features=2, drop_p=-0.1), "drop_p=-0.1; expected 0 <= drop_p < 1"),
])
def test_conv_regressor_rejects_impossible_configurations(kwargs, message):
    kwargs = {"in_channels": 1, "image_size": 128, **kwargs}
    with pytest.raises(ValueError, match=f"backbone conv_regressor: {message}"):
        ConvRegressor(**kwargs)
    try:
        ConvRegressor(**kwargs)
    except ValueError as error:
        assert "\n" not in str(error)
