"""Functional SGD on a params dict: the inner loop every gradient-based meta-learner shares."""
from collections.abc import Callable, Iterable

import torch

Params = dict[str, torch.Tensor]


def sgd_step(params: Params, loss: torch.Tensor, keys: Iterable[str], lrs: float | Params,
             first_order: bool) -> Params:
    """θ' = θ - α ∘ ∇_θ L on `keys` (the other entries pass through unchanged).

    Second order (`first_order=False`) keeps the gradient in the graph (create_graph), so the outer loss
    differentiates through it (MAML, Finn et al. 2017, eq. 1). First order treats ∇L as a constant.
    `lrs` is one float (MAML) or a dict of per-key tensors (MetaSGD's learned rates, differentiable).
    """
    keys = list(keys)
    grads = torch.autograd.grad(loss, [params[k] for k in keys], create_graph=not first_order,
                                allow_unused=True)
    updated = dict(params)
    for key, grad in zip(keys, grads):
        if grad is None:  # the key does not influence the loss (e.g. a frozen branch)
            continue
        lr = lrs[key] if isinstance(lrs, dict) else lrs
        updated[key] = params[key] - lr * grad
    return updated


def adapt(loss_of: Callable[[Params], torch.Tensor], params: Params, keys: Iterable[str], steps: int,
          lrs: float | Params, first_order: bool) -> Params:
    """Run `steps` SGD steps of `loss_of(params)` (the support loss) on `keys`; zero steps is the identity.

    Entries that do not require grad (the momentum target's, which is never trained) are turned into fresh
    leaves first so the inner gradient exists; nothing flows back into them.
    """
    keys = list(keys)
    params = dict(params)
    for key in keys:
        if not params[key].requires_grad:
            params[key] = params[key].detach().requires_grad_()
    with torch.enable_grad():  # evaluation runs under no_grad, but adaptation needs the support gradient
        for _ in range(steps):
            params = sgd_step(params, loss_of(params), keys, lrs, first_order)
    return params
