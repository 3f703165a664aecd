"""Functional SGD on a params dict: the inner loop every gradient-based meta-learner shares.

One step is θ' = θ - α ∘ ∇_θ L(θ). Two interchangeable implementations of that step exist
(simt.algorithms.engines picks one per engine); they differ in who computes the gradient and the update:

- `sgd_step`: torch.autograd.grad, the reference (the per-task loop, and the batched engine, whose
  stacked tasks' summed loss gives every task its own gradient);
- `higher_sgd_step`: the `higher` library's differentiable SGD, an independent implementation.
"""
from collections.abc import Callable, Iterable

import higher
import torch

Params = dict[str, torch.Tensor]
LossOf = Callable[[Params], torch.Tensor]
InnerStep = Callable[..., Params]  # (params, loss_of, keys, lrs, first_order) -> adapted params


def descend(params: Params, grads: dict[str, torch.Tensor | None], lrs: float | Params) -> Params:
    """θ - α ∘ g on the keys of `grads` (a None gradient leaves its entry unchanged); the rest passes through.

    `lrs` is one float (MAML) or a dict of per-key tensors (MetaSGD's learned rates, differentiable).
    One multi-tensor op updates every key (two for MetaSGD) instead of two ops per key: on a GPU a meta-step
    is bound by dispatching ops (Python, autograd), and the inner loop runs this every inner step of every
    task and model. (CUDA fuses the keys into one kernel where the tensors allow: not for the first step's
    expanded weights of stacked tasks, nor for MetaSGD's rates broadcast over tasks; those run a kernel per
    key, still from one dispatch.) The foreach ops are differentiable to any order, as the per-key ones
    (the engine parity tests check it).
    """
    keys = [key for key, grad in grads.items() if grad is not None]  # None: the key does not affect the loss
    if not keys:
        return dict(params)
    values, steps = [params[key] for key in keys], [grads[key] for key in keys]
    if isinstance(lrs, dict):
        updated = torch._foreach_sub(values, torch._foreach_mul(steps, [lrs[key] for key in keys]))
    else:
        updated = torch._foreach_add(values, steps, alpha=-lrs)
    return {**params, **dict(zip(keys, updated))}


def sgd_step(params: Params, loss_of: LossOf, keys: list[str], lrs: float | Params, first_order: bool) -> Params:
    """One SGD step of `loss_of` on `keys`, gradient by torch.autograd.grad.

    Second order (`first_order=False`) keeps the gradient in the graph (create_graph), so the outer loss
    differentiates through it (MAML, Finn et al. 2017, eq. 1). First order treats ∇L as a constant.
    """
    params = _requiring_grad(params, keys)
    grads = torch.autograd.grad(loss_of(params), [params[k] for k in keys], create_graph=not first_order,
                                allow_unused=True)
    return descend(params, dict(zip(keys, grads)), lrs)


def higher_sgd_step(params: Params, loss_of: LossOf, keys: list[str], lrs: float | Params,
                    first_order: bool) -> Params:
    """`sgd_step` done by higher's DifferentiableSGD (gradient and update), with one parameter group per key
    so that MetaSGD's rates are passed as per-group, differentiable learning rates.

    higher's own first-order switch (track_higher_grads=False) would detach the adapted weights from θ
    altogether (no meta-gradient at all); FOMAML's "gradient as a constant" is a detaching grad_callback.
    """
    params = _requiring_grad(params, keys)
    placeholders = [torch.empty(0, requires_grad=True) for _ in keys]  # higher needs an optimizer to copy
    optimizer = torch.optim.SGD([{"params": [p]} for p in placeholders], lr=1.0)
    rates = [lrs[k] if isinstance(lrs, dict) else lrs for k in keys]
    differentiable = higher.optim.get_diff_optim(optimizer, placeholders, override={"lr": rates})
    detach = (lambda grads: [None if g is None else g.detach() for g in grads]) if first_order else None
    stepped = differentiable.step(loss_of(params), params=[params[k] for k in keys], grad_callback=detach)
    return {**params, **dict(zip(keys, stepped))}


def _requiring_grad(params: Params, keys: list[str]) -> Params:
    """autograd differentiates only tensors that require grad. The momentum target's never do (it is never
    trained), so they become fresh leaves; nothing flows back into them."""
    return {**params, **{key: params[key].detach().requires_grad_() for key in keys
                         if not params[key].requires_grad}}


def adapt(loss_of: LossOf, params: Params, keys: Iterable[str], steps: int, lrs: float | Params,
          first_order: bool, step: InnerStep = sgd_step) -> Params:
    """Run `steps` SGD steps of `loss_of(params)` (the support loss) on `keys`; zero steps is the identity.

    `step` is one of the implementations above (the engine's choice).
    """
    keys = list(keys)
    params = dict(params)
    with torch.enable_grad():  # evaluation runs under no_grad, but adaptation needs the support gradient
        for _ in range(steps):
            params = step(params, loss_of, keys, lrs, first_order)
    return params
