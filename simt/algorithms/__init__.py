"""Meta-learners. Each exposes the same small interface the trainer, SiMT and the evaluator rely on:

- `meta_parameters()`: the dict θ the outer optimizer trains (model parameters, plus MetaSGD's rates);
- `momentum_keys`: which entries of θ the momentum target averages;
- `student_outputs(θ, task)`: query outputs for the outer loss (dropout on where SiMT puts it);
- `teacher_outputs(θ_m, task)`: the momentum target's query outputs (no gradient);
- `eval_outputs(θ, task, inner_step=None)`: query outputs at meta-test time (`inner_step`: the inner
  SGD step to adapt with instead of the engine's: batched evaluation adapts with autograd's);
- `tasks_at_once(task_batch)`: within the block, every task given is a stack of tasks (the batched engine);
- `task_loss(outputs, targets)`, `state_dict()` / `load_state_dict()`;
- `engine`: how a meta-batch is run (`simt.algorithms.engines`), resolved from `algo.engine` when built.
"""
from simt.algorithms.maml import GradientLearner
from simt.algorithms.metasgd import MetaSGD
from simt.algorithms.protonet import ProtoNet

__all__ = ["GradientLearner", "MetaSGD", "ProtoNet"]
