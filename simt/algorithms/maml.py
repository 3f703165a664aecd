"""MAML, FOMAML and ANIL: one gradient-based learner, configured by what it adapts and how.

- MAML (Finn et al., 2017): adapt every conv/linear parameter, second-order meta-gradient.
- FOMAML: the same with `first_order=True` (the inner gradient is treated as a constant).
- ANIL (Raghu et al., 2020): adapt the head only (`adapt_scope=head`); the body is meta-learned.

As in the official SiMT code, BatchNorm's affine parameters are meta-learned but, for backbones with a
plain BatchNorm (Conv4, the conv regressor: `adapts_norm = False`), never adapted in the inner loop nor
averaged into the momentum target; ResNet-12's meta-BatchNorm is adapted and averaged like any weight.
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from simt.algorithms.engines import INNER_STEPS, StackedTasks, resolve_engine
from simt.algorithms.inner_loop import InnerStep, Params, adapt
from simt.data.tasks import Task
from simt.losses import sum_over_tasks
from simt.models import set_dropout

ADAPT_SCOPES = ("all", "head")
MOMENTUM_SCOPES = ("model", "adapted")


def _norm_parameter_names(model: nn.Module) -> set[str]:
    return {f"{module_name}.{name}" if module_name else name
            for module_name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for name, _ in module.named_parameters(recurse=False)}


class GradientLearner(StackedTasks):
    """Adapt a params dict on the support set by SGD, then score the query set (MAML family).

    Args:
        model: a backbone with a linear head named `classifier` (kept in train mode: BN is transductive).
        inner_lr: α, the inner SGD step size.
        inner_steps: inner steps during meta-training (official: 5).
        eval_inner_steps: inner steps at meta-test time, always first order (official: 10).
        first_order: FOMAML (True) or second-order MAML (False).
        adapt_scope: which parameters the inner loop adapts: "all" conv/linear ones (MAML) or the "head" (ANIL).
        train_ways: ways of training episodes; None means task.ways (the head has one output per way,
            so gradient learners must train and test with the same ways).
        momentum_scope: what the momentum target averages: the whole "model" (all but plain-BN affine
            parameters, the paper), or only the "adapted" keys (the official code's ANIL: its teacher
            runs the student's current body with the averaged head).
        loss_fn: the task loss on (outputs, targets); cross-entropy for classification.
        engine: how a meta-batch is run and who computes inner gradients (simt.algorithms.engines):
            loop | batched | higher | auto (resolved here, from the model's device).
    """

    embedding_model = False  # the backbone needs a head of `ways` outputs and transductive BatchNorm

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5,
                 eval_inner_steps: int = 10, first_order: bool = False, adapt_scope: str = "all",
                 train_ways: int | None = None, momentum_scope: str = "model",
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                 engine: str = "auto"):
        if adapt_scope not in ADAPT_SCOPES:
            raise ValueError(f"algo.adapt_scope={adapt_scope!r}: expected one of {', '.join(ADAPT_SCOPES)}")
        if momentum_scope not in MOMENTUM_SCOPES:
            raise ValueError(f"algo.momentum_scope={momentum_scope!r}: expected one of {', '.join(MOMENTUM_SCOPES)}")
        self.model = model.train()
        self.inner_lr, self.inner_steps, self.eval_inner_steps = inner_lr, inner_steps, eval_inner_steps
        self.first_order, self.train_ways, self.task_loss = first_order, train_ways, loss_fn
        self.engine = resolve_engine(engine, next(model.parameters()).device)
        norm_names = set() if getattr(model, "adapts_norm", False) else _norm_parameter_names(model)
        self.adapt_keys = [name for name, _ in model.named_parameters() if name not in norm_names
                           and (adapt_scope == "all" or name.startswith("classifier."))]
        self._norm_names, self.momentum_scope = norm_names, momentum_scope

    # -- what the trainer and SiMT see -------------------------------------------------------------
    def meta_parameters(self) -> Params:
        return dict(self.model.named_parameters())

    @property
    def momentum_keys(self) -> list[str]:
        """Everything the outer optimizer trains, except plain-BN affine parameters (official behaviour); with
        momentum_scope "adapted", of the model's weights only those the inner loop adapts (plus learned rates)."""
        model_keys = dict(self.model.named_parameters())
        keys = [k for k in self.meta_parameters() if k not in self._norm_names]
        if self.momentum_scope == "adapted":
            keys = [k for k in keys if k in self.adapt_keys or k not in model_keys]
        return keys

    def momentum_buffers(self) -> Params:
        return {}  # transductive BN keeps no running statistics

    def student_outputs(self, params: Params, task: Task) -> torch.Tensor:
        """Adapt with dropout off, then the query pass with dropout on: SiMT's only student perturbation."""
        adapted = self.adapt(params, task, self.inner_steps, self.first_order)
        set_dropout(self.model, True)
        try:
            return self._forward(adapted, task.query_x)
        finally:
            set_dropout(self.model, False)

    def teacher_outputs(self, params: Params, task: Task) -> torch.Tensor:
        """The momentum target: first-order adaptation, dropout off, no gradient to anything."""
        adapted = self.adapt(params, task, self.inner_steps, first_order=True)
        with torch.no_grad():
            return self._forward(adapted, task.query_x)

    def eval_outputs(self, params: Params, task: Task, inner_step: InnerStep | None = None) -> torch.Tensor:
        """First-order adaptation, then the query pass. `inner_step` overrides the engine's (batched
        evaluation adapts with autograd's step whatever `algo.engine` is)."""
        adapted = self.adapt(params, task, self.eval_inner_steps, first_order=True, step=inner_step)
        with torch.no_grad():
            return self._forward(adapted, task.query_x)

    # -- mechanics ---------------------------------------------------------------------------------
    def adapt(self, params: Params, task: Task, steps: int, first_order: bool,
              step: InnerStep | None = None) -> Params:
        """`steps` SGD steps on the support set, each by `step` (default: the engine's inner step)."""
        set_dropout(self.model, False)  # the inner loop never sees dropout (official behaviour)
        if self._tasks is not None:  # stacked tasks: one copy of the adapted weights per task
            params = self._tasks.stacked(params, self.adapt_keys)
        support_loss = lambda p: self._loss(self._forward(p, task.support_x), task.support_y)  # noqa: E731
        return adapt(support_loss, params, self.adapt_keys, steps, self.inner_lrs_of(params), first_order,
                     step=step or INNER_STEPS[self.engine])

    def inner_lrs_of(self, params: Params) -> float | Params:
        return self.inner_lr

    def _forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return self._network(params, x)

    def _loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The support loss the inner loop descends: per task, or summed over stacked tasks."""
        return self.task_loss(outputs, targets) if self._tasks is None else sum_over_tasks(self.task_loss, outputs,
                                                                                           targets)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
