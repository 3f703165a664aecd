"""CUDA checks (marked `gpu`; `make bench-gpu` runs them before the benchmark): the batched engine and batched
evaluation against the per-task loop on the GPU (float64), and a whole run on CUDA with the defaults a GPU
user gets (engine auto -> batched, eval_batch auto -> 64, data on the device) plus bf16.
The same comparisons run on the CPU in tests/test_engines.py and tests/test_batched_eval.py.
"""
import json

import pytest
import torch

from simt.algorithms import GradientLearner, MetaSGD, ProtoNet
from simt.data.tasks import Task
from simt.evaluator import evaluate
from simt.models import Conv4, ResNet12
from simt.momentum import MomentumTarget
from simt.trainer import meta_batch_loss
from tests.conftest import fast, run_cli

pytestmark = pytest.mark.gpu
CUDA, F64, WAYS = torch.device("cuda"), torch.float64, 3
LEARNERS = {"maml": (GradientLearner, {}), "metasgd": (MetaSGD, {}), "protonet": (ProtoNet, {})}


def _tasks(count: int, seed: int = 0) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.rand(WAYS * n, 1, 16, 16, generator=g, dtype=F64)  # noqa: E731
    y = lambda n: torch.arange(WAYS).repeat_interleave(n)  # noqa: E731
    return [Task(x(2), y(2), x(3), y(3)).to(CUDA) for _ in range(count)]


def _learner(algo: str, backbone: str, engine: str):
    cls, kwargs = LEARNERS[algo]
    embedding = cls is ProtoNet
    torch.manual_seed(0)
    out = None if embedding else WAYS
    model = (Conv4(1, 16, out, hidden=4, transductive_bn=not embedding) if backbone == "conv4" else
             ResNet12(1, 16, out, widths=(2, 2, 2, 2), transductive_bn=not embedding)).to(CUDA, F64)
    extra = {} if embedding else {"inner_lr": 0.1, "inner_steps": 2, "eval_inner_steps": 3}
    return cls(model, engine=engine, **extra, **kwargs)


def _target(learner) -> MomentumTarget:
    target = MomentumTarget(learner.meta_parameters(), learner.momentum_keys, learner.momentum_buffers(),
                            eta=0.9, lam=0.5, temp=4.0)
    for key in target.keys:
        target.params[key].mul_(1.05)  # differs from the student: the distillation term is not zero
    return target


@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
@pytest.mark.parametrize("algo", list(LEARNERS))
def test_batched_engine_gives_the_loops_meta_gradient_on_cuda(algo, backbone):
    grads = {}
    for engine in ("loop", "batched"):
        learner = _learner(algo, backbone, engine)
        loss, _ = meta_batch_loss(learner, _target(learner), _tasks(2))
        theta = list(learner.meta_parameters().values())
        grads[engine] = torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                                   for p, g in zip(theta, torch.autograd.grad(loss, theta, allow_unused=True))])
    assert grads["loop"].norm() > 0
    assert ((grads["batched"] - grads["loop"]).norm() / grads["loop"].norm()).item() <= 1e-6


@pytest.mark.parametrize("algo", list(LEARNERS))
def test_batched_evaluation_equals_per_episode_on_cuda(algo):
    learner = _learner(algo, "conv4", "loop")
    models = {"student": learner.meta_parameters(), "target": _target(learner).params}
    tasks = _tasks(7, seed=1)
    one = evaluate(learner, models, tasks, CUDA)
    batched = evaluate(learner, models, tasks, CUDA, batch_size=3)
    assert one == batched


def test_a_run_on_cuda_with_gpu_defaults_and_bf16(tmp_path):
    done = run_cli(*fast("trainer.device=cuda", "trainer.precision=bf16", "algo.engine=auto"),
                   f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["trainer"]["precision"] == "bf16" and 0 <= results["test/acc"] <= 100
    assert "held on cuda" in done.stderr + done.stdout
