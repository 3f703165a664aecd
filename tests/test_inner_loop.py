"""Inner loops: the functional SGD against independent references (higher, finite differences)."""
import higher
import pytest
import torch
import torch.nn.functional as F

from simt.algorithms import GradientLearner, MetaSGD
from simt.algorithms.inner_loop import adapt
from simt.data.tasks import Task
from simt.models import Conv4


def _task(ways=3, shots=2, queries=3, size=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.rand(ways * n, 1, size, size, generator=g, dtype=dtype)  # noqa: E731
    y = lambda n: torch.arange(ways).repeat_interleave(n)  # noqa: E731
    return Task(x(shots), y(shots), x(queries), y(queries))


def _learner(cls=GradientLearner, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    model = Conv4(1, 16, out_features=3, hidden=4).to(dtype)
    return cls(model, inner_lr=0.1, inner_steps=2, **kwargs)


def _support_loss(learner, params, task):
    return F.cross_entropy(learner._forward(params, task.support_x), task.support_y)


def test_zero_steps_is_identity():
    learner, task = _learner(), _task()
    params = learner.meta_parameters()
    adapted = learner.adapt(params, task, steps=0, first_order=False)
    assert all(adapted[k] is params[k] for k in params)


def test_a_step_lowers_the_support_loss():
    learner, task = _learner(), _task()
    params = learner.meta_parameters()
    before = _support_loss(learner, params, task)
    after = _support_loss(learner, learner.adapt(params, task, steps=1, first_order=True), task)
    assert after.item() < before.item()


def _meta_gradient(learner, task):
    params = learner.meta_parameters()
    loss = F.cross_entropy(learner._forward(learner.adapt(params, task, 2, learner.first_order), task.query_x),
                           task.query_y)
    return torch.autograd.grad(loss, list(params.values()), allow_unused=True)


def test_second_order_meta_gradient_equals_higher():
    learner, task = _learner(dtype=torch.float64), _task(dtype=torch.float64)
    ours = _meta_gradient(learner, task)

    model = learner.model
    adapted = [p for name, p in model.named_parameters() if name in learner.adapt_keys]
    inner_opt = torch.optim.SGD(adapted, lr=0.1)
    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(F.cross_entropy(fmodel(task.support_x), task.support_y))
        query_loss = F.cross_entropy(fmodel(task.query_x), task.query_y)
        reference = torch.autograd.grad(query_loss, list(model.parameters()), allow_unused=True)

    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    assert (flat(ours) - flat(reference)).norm() / flat(reference).norm() <= 1e-6


def test_second_order_meta_gradient_matches_finite_differences():
    learner, task = _learner(dtype=torch.float64), _task(dtype=torch.float64)
    grads = _meta_gradient(learner, task)
    params = learner.meta_parameters()
    direction = {k: torch.randn_like(v, generator=torch.Generator().manual_seed(1)) for k, v in params.items()}
    analytic = sum((g * direction[k]).sum() for (k, _), g in zip(params.items(), grads))

    def outer(eps):
        shifted = {k: (v + eps * direction[k]).detach().requires_grad_() for k, v in params.items()}
        adapted = learner.adapt(shifted, task, 2, first_order=False)
        return F.cross_entropy(learner._forward(adapted, task.query_x), task.query_y).item()

    eps = 1e-5
    numeric = (outer(eps) - outer(-eps)) / (2 * eps)
    assert abs(analytic.item() - numeric) <= 1e-6 * max(1.0, abs(numeric))


def test_first_order_meta_gradient_differs_from_second_order():
    task = _task(dtype=torch.float64)
    second = _meta_gradient(_learner(dtype=torch.float64), task)
    first = _meta_gradient(_learner(dtype=torch.float64, first_order=True), task)
    diff = sum((a - b).abs().sum() for a, b in zip(second, first) if a is not None)
    assert diff > 1e-6


def test_anil_adapts_only_the_head():
    learner, task = _learner(adapt_scope="head"), _task()
    params = learner.meta_parameters()
    adapted = learner.adapt(params, task, steps=2, first_order=False)
    assert learner.adapt_keys == ["classifier.weight", "classifier.bias"]
    for key in params:
        if key.startswith("classifier."):
            assert not torch.equal(adapted[key], params[key])
        else:
            assert adapted[key] is params[key]


def test_maml_never_adapts_batchnorm_affine():
    learner = _learner()
    assert not any(".norm." in key for key in learner.adapt_keys)
    assert any(".norm." in key for key in learner.meta_parameters())


@pytest.mark.parametrize("lr_shape", ["element", "tensor"])
def test_metasgd_rates_receive_gradients(lr_shape):
    learner, task = _learner(MetaSGD, lr_shape=lr_shape), _task()
    params = learner.meta_parameters()
    rates = [k for k in params if k.startswith("inner_lr.")]
    assert len(rates) == len(learner.adapt_keys)
    first_key = learner.adapt_keys[0]
    expected_shape = params[first_key].shape if lr_shape == "element" else torch.Size([])
    assert params["inner_lr." + first_key].shape == expected_shape
    grads = dict(zip(params, _meta_gradient(learner, task)))
    assert all(grads[k] is not None and grads[k].abs().sum() > 0 for k in rates)


def test_adapt_leaves_non_grad_params_untouched():
    """The momentum target's tensors never require grad; adaptation must not modify them in place."""
    learner, task = _learner(), _task()
    frozen = {k: v.detach().clone() for k, v in learner.meta_parameters().items()}
    snapshot = {k: v.clone() for k, v in frozen.items()}
    adapted = adapt(lambda p: _support_loss(learner, p, task), frozen, learner.adapt_keys, 2, 0.1, True)
    assert all(torch.equal(frozen[k], snapshot[k]) for k in frozen)
    assert not torch.equal(adapted["classifier.weight"], frozen["classifier.weight"])


def test_resnet12_meta_batchnorm_is_adapted_and_averaged():
    from simt.models import ResNet12

    learner = GradientLearner(ResNet12(1, 16, out_features=3, widths=(2, 2, 2, 2)))
    assert any(".bn1." in key for key in learner.adapt_keys)
    assert set(learner.momentum_keys) == set(learner.meta_parameters())


@pytest.mark.parametrize("rates", ["float", "per_key"])
def test_descend_updates_every_key_in_one_differentiable_op(rates):
    """θ - α ∘ g for every key with a gradient (none: unchanged), in one multi-tensor op per step (two with
    MetaSGD's per-key rates), differentiable to second order like the per-key expression."""
    from benchmarks.bench import count_ops
    from simt.algorithms.inner_loop import descend

    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True) for k in "abc"}
    lrs = 0.1 if rates == "float" else {k: torch.rand(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
                                        for k in "ab"}
    loss = sum((p ** 3).sum() for p in params.values())
    grads = dict(zip("ab", torch.autograd.grad(loss, [params["a"], params["b"]], create_graph=True)))
    grads["frozen"] = None
    params["frozen"] = torch.ones(2)
    ops = count_ops(lambda: descend(params, grads, lrs))
    assert ops == (1 if rates == "float" else 2)
    updated = descend(params, grads, lrs)
    assert updated["c"] is params["c"] and updated["frozen"] is params["frozen"]
    rate = (lambda k: lrs) if rates == "float" else (lambda k: lrs[k])
    reference = {k: params[k] - rate(k) * grads[k] for k in "ab"}
    for key in "ab":
        torch.testing.assert_close(updated[key], reference[key], rtol=0, atol=1e-15)
    inputs = [params["a"], params["b"], *(lrs.values() if isinstance(lrs, dict) else [])]
    second = torch.autograd.grad(sum((updated[k] ** 2).sum() for k in "ab"), inputs, retain_graph=True)
    expected = torch.autograd.grad(sum((reference[k] ** 2).sum() for k in "ab"), inputs)
    for value, wanted in zip(second, expected):
        torch.testing.assert_close(value, wanted, rtol=1e-12, atol=1e-12)
