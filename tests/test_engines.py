"""Engines (algo.engine): the batched (vmap) and higher engines against the per-task loop.

Same meta-gradient (float64, relative error <= 1e-6) and the same logged statistics for every algorithm,
with and without SiMT, on Conv4 and a narrow ResNet-12; exact BatchNorm under vmap; per-task dropout
masks; the config key. Tiny widths and 16x16 images keep the file fast on two CPU cores.
"""
import dataclasses
import functools
import json

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from benchmarks.bench import count_ops
from simt import pipeline
from simt.algorithms import GradientLearner, MetaSGD, ProtoNet, engines
from simt.algorithms.engines import TaskBatch, meta_batch_outputs, resolve_engine
from simt.algorithms.inner_loop import sgd_step
from simt.data.tasks import Task
from simt.data.regression import mse, mse_values
from simt.evaluator import Metric
from simt.losses import sum_over_tasks
from simt.models import Conv4, ConvRegressor, ResNet12
from simt.models.batch_norm import ExactBatchNorm2d, exact_batch_norm
from simt.models.task_folding import FoldedBatchNorm2d, FoldedConv2d, FoldedLinear, fold, folded_tasks, unfold
from simt.momentum import MomentumTarget
from simt.trainer import meta_batch_backward, meta_batch_loss
from tests.conftest import fast, make_cfg, run_cli

F64 = torch.float64
ALGOS = {  # config name -> learner class and its constructor arguments
    "maml": (GradientLearner, {}),
    "fomaml": (GradientLearner, {"first_order": True}),
    "anil": (GradientLearner, {"adapt_scope": "head"}),
    "metasgd": (MetaSGD, {}),
    "protonet": (ProtoNet, {}),
}
WAYS = 3


def _tasks(count=2, shots=2, queries=2, seed=0, shuffle_labels=False) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(count):
        x = lambda n: torch.rand(WAYS * n, 1, 16, 16, generator=g, dtype=F64)  # noqa: E731
        y = lambda n: torch.arange(WAYS).repeat_interleave(n)  # noqa: E731
        support_y, query_y = y(shots), y(queries)
        if shuffle_labels:  # labels that differ between tasks enter vmap batched
            classes = torch.randperm(WAYS, generator=g)
            support_y, query_y = classes[support_y], classes[query_y]
        tasks.append(Task(x(shots), support_y, x(queries), query_y))
    return tasks


def _learner(algo: str, backbone: str, engine: str, drop_p: float = 0.0):
    cls, kwargs = ALGOS[algo]
    embedding = cls is ProtoNet
    torch.manual_seed(0)
    out = None if embedding else WAYS
    if backbone == "conv4":
        model = Conv4(1, 16, out, hidden=4, drop_p=drop_p, transductive_bn=not embedding)
    else:
        model = ResNet12(1, 16, out, widths=(2, 2, 2, 2), drop_p=drop_p, transductive_bn=not embedding)
    gradient = {} if embedding else {"inner_lr": 0.1, "inner_steps": 2}
    return cls(model.to(F64), engine=engine, **gradient, **kwargs)


def _target(learner) -> MomentumTarget:
    target = MomentumTarget(learner.meta_parameters(), learner.momentum_keys, learner.momentum_buffers(),
                            eta=0.9, lam=0.5, temp=4.0)
    g = torch.Generator().manual_seed(1)
    for key in target.keys:  # a target that differs from the student: distillation is not zero
        target.params[key].add_(0.05 * torch.randn(target.params[key].shape, generator=g, dtype=F64))
    return target


@functools.lru_cache(maxsize=None)
def _meta_step(algo: str, backbone: str, engine: str, simt: bool, shuffle_labels: bool = False, count: int = 2,
               tasks_per_backward: int | None = None):
    """One meta-batch as the trainer runs it (meta_batch_backward): flattened meta-gradient, logged
    statistics, BN buffers (student's and target's)."""
    learner = _learner(algo, backbone, engine)
    target = _target(learner) if simt else None
    _, stats = meta_batch_backward(learner, target, _tasks(count=count, shuffle_labels=shuffle_labels),
                                   tasks_per_backward=tasks_per_backward)
    flat = _flat_grads(learner)
    model_buffers = dict(learner.model.named_buffers())  # ProtoNet's running statistics; none in the MAML family
    buffers = {f"student.{k}": v.clone() for k, v in model_buffers.items()}
    if target is not None:
        buffers.update({f"target.{k}": target.params[k].clone() for k in model_buffers})
    return flat, stats, buffers


def _flat_grads(learner) -> torch.Tensor:
    params = learner.meta_parameters().values()
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params])


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("simt", [False, True], ids=["plain", "simt"])
@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("engine", ["batched", "higher"])
def test_engine_gives_the_loops_meta_gradient_and_statistics(engine, algo, backbone, simt):
    reference, reference_stats, reference_buffers = _meta_step(algo, backbone, "loop", simt)
    grads, stats, buffers = _meta_step(algo, backbone, engine, simt)
    assert reference.norm() > 0
    assert _relative_error(grads, reference) <= 1e-6
    assert stats.keys() == reference_stats.keys()
    for name, value in reference_stats.items():
        assert stats[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    if simt:
        assert reference_stats["distill_loss"] > 0
    # ProtoNet's running BN statistics (student's and target's) move the same way in every engine.
    assert buffers.keys() == reference_buffers.keys()
    for name, value in reference_buffers.items():
        torch.testing.assert_close(buffers[name], value, rtol=1e-9, atol=1e-12)
    if algo == "protonet":  # the buffers did move
        initial = dict(_learner(algo, backbone, "loop").model.named_buffers())
        assert all(not torch.equal(reference_buffers[f"student.{k}"], v) for k, v in initial.items())


@pytest.mark.parametrize("stack_scores", [True, False])
def test_batched_engine_on_the_conv_regressor_with_mse(stack_scores):
    """Regression: float targets differ per task (they enter vmap batched); D is the MSE to the teacher. The
    metric scores a stack of tasks on the device (`values`, as the data sets' metrics) or task by task."""
    g = torch.Generator().manual_seed(0)
    images = lambda n: torch.rand(n, 1, 16, 16, generator=g, dtype=F64)  # noqa: E731
    targets = lambda n: torch.rand(n, 2, generator=g, dtype=F64) * 2 - 1  # noqa: E731  (cos, sin)-like
    tasks = [Task(images(4), targets(4), images(6), targets(6)) for _ in range(2)]
    metric = Metric(mse, "mse", higher_is_better=False, values=mse_values if stack_scores else None)
    results = {}
    for engine in ("loop", "batched", "higher"):
        torch.manual_seed(0)
        model = ConvRegressor(1, 16, out_features=2, hidden=4, output_activation="tanh").to(F64)
        learner = GradientLearner(model, inner_lr=0.1, inner_steps=2, loss_fn=F.mse_loss, engine=engine)
        target = MomentumTarget(learner.meta_parameters(), learner.momentum_keys, {}, eta=0.9, lam=0.5, temp=4.0,
                                distillation="mse")
        for key in target.keys:
            target.params[key].mul_(1.05)
        loss, stats = meta_batch_loss(learner, target, tasks, metric)
        grads = torch.autograd.grad(loss, list(learner.meta_parameters().values()))
        results[engine] = torch.cat([grad.flatten() for grad in grads]), stats
    reference, reference_stats = results["loop"]
    for engine in ("batched", "higher"):
        grads, stats = results[engine]
        assert _relative_error(grads, reference) <= 1e-6
        assert stats == pytest.approx(reference_stats, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("algo", ["maml", "metasgd", "protonet"])
def test_evaluation_outputs_agree_across_engines(algo):
    """Validation and test adapt one task at a time with the engine's inner step (first order, 10 steps)."""
    task = _tasks(count=1)[0]
    outputs = {}
    for engine in ("loop", "batched", "higher"):
        learner = _learner(algo, "conv4", engine)
        with torch.no_grad():  # as the evaluator calls it
            outputs[engine] = learner.eval_outputs(learner.meta_parameters(), task)
    for engine in ("batched", "higher"):
        torch.testing.assert_close(outputs[engine], outputs["loop"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("algo", ["maml", "protonet"])
@pytest.mark.parametrize("tasks_per_backward", [2, 3])
def test_batched_engine_in_groups_of_tasks_gives_the_loops_meta_gradient(tasks_per_backward, algo):
    """trainer.tasks_per_backward: 5 tasks as 2+2+1 or 3+2 stacked groups, each backpropagated on its own
    (less memory than one graph of 5), give the loop's gradient, statistics and BN running statistics."""
    reference, reference_stats, reference_buffers = _meta_step(algo, "conv4", "loop", True, count=5)
    grads, stats, buffers = _meta_step(algo, "conv4", "batched", True, count=5, tasks_per_backward=tasks_per_backward)
    assert _relative_error(grads, reference) <= 1e-6
    assert stats == pytest.approx(reference_stats, rel=1e-9, abs=1e-12)
    for name, value in reference_buffers.items():
        torch.testing.assert_close(buffers[name], value, rtol=1e-9, atol=1e-12)


def test_batched_engine_with_labels_that_differ_between_tasks():
    reference, _, _ = _meta_step("maml", "conv4", "loop", True, shuffle_labels=True)
    grads, _, _ = _meta_step("maml", "conv4", "batched", True, shuffle_labels=True)
    assert _relative_error(grads, reference) <= 1e-6


@pytest.mark.parametrize("engine,calls", [("loop", 2), ("batched", 1)])
def test_batched_engine_runs_the_meta_batch_as_one_stacked_task(engine, calls, monkeypatch):
    learner = _learner("maml", "conv4", engine)
    seen = []
    original = learner.student_outputs
    monkeypatch.setattr(learner, "student_outputs", lambda *args: seen.append(1) or original(*args))
    meta_batch_loss(learner, None, _tasks(count=2))
    assert len(seen) == calls


@pytest.mark.parametrize("engine,tasks_per_backward,calls", [("batched", None, 1), ("batched", 2, 3),
                                                              ("batched", 9, 1), ("loop", 2, 5)])
def test_tasks_per_backward_sets_the_batched_engines_groups(engine, tasks_per_backward, calls, monkeypatch):
    learner = _learner("maml", "conv4", engine)
    seen = []
    original = learner.student_outputs
    monkeypatch.setattr(learner, "student_outputs", lambda *args: seen.append(1) or original(*args))
    meta_batch_backward(learner, None, _tasks(count=5), tasks_per_backward=tasks_per_backward)
    assert len(seen) == calls  # the per-task engines stay per task


@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_backward_per_task_accumulates_the_gradient_of_the_mean_loss(engine, algo):
    """meta_batch_backward (what training runs) against autograd.grad of meta_batch_loss, the whole
    meta-batch in one graph; with SiMT, and scaled as a torchrun rank scales its share."""
    learner = _learner(algo, "conv4", engine)
    target = _target(learner)
    loss, stats = meta_batch_loss(learner, target, _tasks(count=3))
    theta = list(learner.meta_parameters().values())
    grads = torch.autograd.grad(loss, theta, allow_unused=True)
    reference = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(theta, grads)])
    if algo == "protonet":  # the BN running statistics moved in that pass: start the second from the same
        learner = _learner(algo, "conv4", engine)
        target = _target(learner)
    value, backward_stats = meta_batch_backward(learner, target, _tasks(count=3), scale=0.5)
    assert value == pytest.approx(loss.item(), rel=1e-12)
    assert backward_stats == pytest.approx(stats, rel=1e-12)
    assert _relative_error(_flat_grads(learner), 0.5 * reference) <= 1e-12


@pytest.mark.parametrize("algo", ["maml", "protonet"])
@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_a_meta_step_reads_from_the_device_once_after_every_backward(engine, algo, monkeypatch):
    """Losses and statistics are read in one transfer at the end of meta_batch_backward: a read (.item(),
    int()) between forward and backward would make the CPU wait for a GPU's forward before queueing the
    backward. ProtoNet takes the number of classes from the task (its sampler knows it), not the labels."""
    learner = _learner(algo, "conv4", engine)
    target = _target(learner)
    tasks = [dataclasses.replace(task, ways=WAYS) for task in _tasks(count=3)]
    expected = meta_batch_backward(learner, target, tasks)
    reads = []
    for name in ("item", "tolist", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _f=original, _n=name: reads.append(_n) or _f(self))
    learner.model.zero_grad()
    assert meta_batch_backward(learner, target, tasks) == expected
    assert reads == ["tolist"]


@pytest.mark.parametrize("engine,expected", [("loop", ["task", "backward"] * 3), ("higher", ["task", "backward"] * 3),
                                             ("batched", ["task", "backward"])])  # one stacked task for all
def test_per_task_engines_backpropagate_each_task_before_running_the_next(engine, expected):
    """The loop keeps one task's graph at a time (peak memory: one task, as the official code);
    the batched engine has one graph for the meta-batch."""
    learner = _learner("maml", "conv4", engine)
    order = []
    weight = learner.meta_parameters()["classifier.weight"]
    weight.register_post_accumulate_grad_hook(lambda param: order.append("backward"))  # .grad, not autograd.grad
    original = learner.student_outputs
    learner.student_outputs = lambda *args: order.append("task") or original(*args)
    meta_batch_backward(learner, None, _tasks(count=3))
    assert order == expected


def test_higher_engine_adapts_with_higher(monkeypatch):
    steps = []
    original = higher.optim.DifferentiableOptimizer.step
    monkeypatch.setattr(higher.optim.DifferentiableOptimizer, "step",
                        lambda self, *args, **kwargs: steps.append(1) or original(self, *args, **kwargs))
    learner = _learner("maml", "conv4", "higher")
    meta_batch_loss(learner, _target(learner), _tasks(count=2))
    assert len(steps) == 2 * 2 * 2  # (student + teacher) x 2 tasks x 2 inner steps


# -- exact BatchNorm ------------------------------------------------------------------------------

def _conv_bn() -> nn.Module:
    torch.manual_seed(0)
    # No conv bias: BN cancels it, so its gradient is zero up to rounding and no use for a relative error.
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False),
                          nn.BatchNorm2d(3, momentum=1.0, track_running_stats=False))
    with torch.no_grad():  # non-trivial affine parameters
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.to(F64)


def _one_inner_step_then_query(model: nn.Module, batched: bool):
    """Four tasks' query outputs after one second-order SGD step on their support sets, and the
    meta-gradients of a fixed weighting of them: task by task (sgd_step, plain modules), or all at once
    as the batched engine runs them (TaskBatch: the model folded if it allows it, else under vmap)."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    support, query = (torch.randn(4, 5, 2, 6, 6, generator=g, dtype=F64) for _ in range(2))
    weights = torch.randn(4, 5, 3, 6, 6, generator=g, dtype=F64)
    if batched:
        tasks = TaskBatch(4, model)
        loss_of = lambda p: sum_over_tasks(lambda out, _: out.sin().mean(), tasks.forward(p, support),  # noqa: E731
                                           torch.zeros(4))
        out = tasks.forward(sgd_step(tasks.stacked(params, list(params)), loss_of, list(params), 0.5, False), query)
    else:
        def one_task(s, q):
            loss_of = lambda p: functional_call(model, p, (s,)).sin().mean()  # noqa: E731
            return functional_call(model, sgd_step(params, loss_of, list(params), 0.5, False), (q,))
        out = torch.stack([one_task(s, q) for s, q in zip(support, query)])
    return out, torch.autograd.grad((out * weights).sum(), list(params.values()))


@pytest.mark.parametrize("folds", [False, True], ids=["vmap-exact-bn", "folded"])
def test_stacked_tasks_through_batchnorm_equal_the_loop_to_second_order(folds):
    """Values and second-order meta-gradients of one inner SGD step through BN with batch statistics whose
    affine parameters are adapted (the case vmap's fused-BN rule got wrong), on both batched paths."""
    model = _conv_bn()
    model.folds_tasks = folds
    loop, loop_grads = _one_inner_step_then_query(model, batched=False)
    batched, batched_grads = _one_inner_step_then_query(model, batched=True)
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-12)
    for got, expected in zip(batched_grads, loop_grads):
        assert _relative_error(got, expected) <= 1e-9


@pytest.mark.parametrize("per_task", [True, False], ids=["own-weights", "shared-weights"])
def test_folded_layers_give_each_task_what_the_plain_layer_gives_it(per_task):
    """Conv2d (strided, grouped, biased), BatchNorm2d and Linear on 3 tasks folded into the channels, with
    a weight per task or one shared weight, against each task through the plain layer."""
    tasks, g = 3, torch.Generator().manual_seed(0)
    layers = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
                           nn.BatchNorm2d(6, track_running_stats=False), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).to(F64)
    params = {k: (torch.randn(tasks, *v.shape, generator=g, dtype=F64) if per_task else v.detach() + 0.1)
              for k, v in layers.named_parameters()}
    x = torch.randn(tasks, 7, 4, 8, 8, generator=g, dtype=F64)
    expected = torch.stack([functional_call(layers, {k: v[t] if per_task else v for k, v in params.items()}, (x[t],))
                            for t in range(tasks)])
    with folded_tasks(layers, tasks):
        assert [type(m) for m in layers][:2] == [FoldedConv2d, FoldedBatchNorm2d] and type(layers[3]) is FoldedLinear
        got = unfold(functional_call(layers, params, (fold(x),)), tasks)
        again = unfold(functional_call(layers, params, (fold(x),)), tasks)
        # Shared weights are repeated once per block (conv and BN weight and bias), however many passes use them.
        assert len(layers[0].shared_copies) == (0 if per_task else 4)
        assert layers[0].shared_copies is layers[1].shared_copies
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(again, got)
    assert [type(m) for m in layers] == [nn.Conv2d, nn.BatchNorm2d, nn.Flatten, nn.Linear]
    assert not any(hasattr(m, "tasks") for m in layers)


@pytest.mark.parametrize("folds", [True, False], ids=["foldable", "vmap"])
@pytest.mark.parametrize("per_task", [True, False], ids=["own-weights", "shared-weights"])
def test_a_task_batch_in_eval_mode_gives_each_task_its_own_output(per_task, folds):
    """Running BatchNorm statistics in eval mode (ProtoNet's evaluation): with shared weights all tasks go
    through as one ordinary batch; with a weight per task they must not (folded, or under vmap)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)).to(F64).eval()
    model[1].running_mean.uniform_(-1, 1, generator=g)
    model.folds_tasks = folds
    params = {k: v.detach() + 0.1 * torch.randn((4, *v.shape) if per_task else v.shape, generator=g, dtype=F64)
              for k, v in model.named_parameters()}
    x = torch.randn(4, 5, 2, 6, 6, generator=g, dtype=F64)
    expected = torch.stack([functional_call(model, {k: v[t] if per_task else v for k, v in params.items()}, (x[t],))
                            for t in range(4)])
    torch.testing.assert_close(TaskBatch(4, model).forward(params, x), expected, rtol=1e-12, atol=1e-12)


def _folded_passes(batched: nn.BatchNorm2d, first: torch.Tensor, second: torch.Tensor) -> None:
    with folded_tasks(batched, first.shape[0]) as statistics:
        batched(fold(first)), batched(fold(second))
    statistics.apply(statistics.values)


def _vmapped_passes(batched: nn.BatchNorm2d, first: torch.Tensor, second: torch.Tensor) -> None:
    with exact_batch_norm(batched) as statistics:
        _, values = torch.func.vmap(lambda a, b: ((batched(a), batched(b)), statistics.values))(first, second)
        statistics.apply(values)


@pytest.mark.parametrize("passes", [_folded_passes, _vmapped_passes], ids=["folded", "vmap-exact"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_of_stacked_tasks_follow_the_loops_updates(momentum, passes):
    g = torch.Generator().manual_seed(0)
    first, second = (torch.randn(3, 4, 2, 5, 5, generator=g, dtype=F64) * 2 + 1 for _ in range(2))  # 3 tasks
    loop, batched = (nn.BatchNorm2d(2, momentum=momentum).to(F64) for _ in range(2))
    for a, b in zip(first, second):  # two passes per task, as ProtoNet's support and query passes
        loop(a), loop(b)
    passes(batched, first, second)
    for name, value in loop.named_buffers():
        torch.testing.assert_close(dict(batched.named_buffers())[name], value, rtol=1e-12, atol=1e-14)
    assert int(batched.num_batches_tracked) == 6


def test_folded_batch_norm_keeps_float32_statistics_of_bf16_activations():
    """Under bf16 autocast the activations are bf16; nn.BatchNorm2d's kernel still accumulates the running
    statistics in float32, and so does the folded layer (bf16 statistics were off by up to 1.5%)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 16, 2, 6, 6, generator=g) * 3 + 2).bfloat16()  # 3 tasks
    loop, batched = nn.BatchNorm2d(2, affine=False), nn.BatchNorm2d(2, affine=False)
    for task in x:
        loop(task.float())  # the same bf16 values, accumulated in float32
    with folded_tasks(batched, 3) as statistics:
        batched(fold(x))
    statistics.apply(statistics.values)
    assert batched.running_mean.dtype == torch.float32
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(batched, name), getattr(loop, name), rtol=1e-5, atol=1e-6)


def test_a_shared_weights_copy_made_without_grad_is_not_reused_with_grad():
    """The teacher's passes run without grad; a per-task copy of a shared weight made there has no graph,
    so a later pass with grad must make its own (else θ's gradient through it would silently be zero)."""
    model = _conv_bn()
    x = torch.randn(2, 4, 2, 6, 6, dtype=F64)
    with folded_tasks(model, 2):
        with torch.no_grad():
            model(fold(x))
        model(fold(x)).square().sum().backward()
    assert model[1].weight.grad is not None and model[1].weight.grad.norm() > 0


def test_gradient_learner_with_running_batchnorm_statistics_matches_the_loop_when_batched():
    """A MAML network with standard BatchNorm (transductive_bn=false): same meta-gradient and the same
    running statistics as the loop (recorded per task, applied in the loop's order)."""
    results = {}
    for engine in ("loop", "batched"):
        torch.manual_seed(0)
        learner = GradientLearner(Conv4(1, 16, WAYS, hidden=4, transductive_bn=False).to(F64), engine=engine,
                                  inner_lr=0.1, inner_steps=2)
        meta_batch_backward(learner, None, _tasks(count=3))
        results[engine] = _flat_grads(learner), {k: v.clone() for k, v in learner.model.named_buffers()}
    assert _relative_error(results["batched"][0], results["loop"][0]) <= 1e-9
    for name, value in results["loop"][1].items():
        torch.testing.assert_close(results["batched"][1][name], value, rtol=1e-12, atol=1e-14)


def test_folding_is_undone_on_error_and_refuses_what_it_cannot_fold():
    model = _conv_bn()
    with pytest.raises(RuntimeError, match="boom"):
        with folded_tasks(model, 2):
            raise RuntimeError("boom")
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d] and not hasattr(model[1], "running_statistics")
    with pytest.raises(ValueError, match="zero-padded convolutions only, not 'reflect'"):
        with folded_tasks(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), 2):
            pass


def test_batched_engine_dispatches_far_fewer_ops_than_the_loop():
    """What the batched engine is for: a GPU runs this workload at the speed ops are dispatched (an H100,
    2026-11-27: about 25 us per op, 0.7% of its matmul peak at 28x28). Counted, not timed: every op dispatched in
    one Conv4 MAML + SiMT meta-step of 4 tasks (forward, inner and outer backward)."""
    counts = {}
    for engine in ("loop", "batched"):
        learner = _learner("maml", "conv4", engine)
        target, tasks = _target(learner), _tasks(count=4)
        meta_batch_backward(learner, target, tasks)  # warm-up
        counts[engine] = count_ops(lambda: meta_batch_backward(learner, target, tasks))
    assert counts["loop"] >= 2.5 * counts["batched"], counts


def test_batched_losses_and_statistics_cost_the_same_ops_for_any_number_of_tasks():
    """The batched engine computes the query losses, the distillation and the statistics once for the stacked
    tasks (sums over the stack), not once per task: with the tasks drawn beforehand, a ProtoNet + SiMT step
    (no inner loop, so no per-task double backward either) dispatches as many ops for 4 tasks as for 2."""
    counts = {}
    for count in (2, 4):
        learner = _learner("protonet", "conv4", "batched")
        target, tasks = _target(learner), _tasks(count=count)
        meta_batch_backward(learner, target, tasks)  # warm-up
        counts[count] = count_ops(lambda: meta_batch_backward(learner, target, tasks))
    assert counts[4] == counts[2], counts


def _squared_cross_entropy(outputs, targets):  # not a mean over samples: the batched engine must vmap it
    return F.cross_entropy(outputs, targets) ** 2


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("name, one_call", [("cross_entropy", True), ("mse", True), ("azimuth", True),
                                            ("distillation_kl", True), ("distillation_mse", True),
                                            ("squared_cross_entropy", False)])
def test_stacked_task_loss_is_the_sum_of_the_task_losses(name, one_call, count, monkeypatch):
    """Losses that average over their samples run once on the stacked samples; any other loss runs under
    vmap, task by task (a stack of one: plainly): either way, the sum over the tasks of the loss of each (with
    its keyword arguments: the distillation temperature), and its gradient."""
    from simt.data.regression import azimuth_loss
    from simt.momentum import distillation_kl, distillation_mse

    g = torch.Generator().manual_seed(0)
    logits = lambda: torch.randn(count, 6, 4, generator=g, dtype=torch.float64)  # noqa: E731
    classes = lambda: torch.randint(0, 4, (count, 6), generator=g)  # noqa: E731
    values = lambda: torch.randn(count, 6, 2, generator=g, dtype=torch.float64)  # noqa: E731
    loss_fn, outputs, targets = {
        "cross_entropy": (F.cross_entropy, logits(), classes()),
        "mse": (F.mse_loss, values(), values()),
        "azimuth": (azimuth_loss, values(), values()),
        "distillation_kl": (functools.partial(distillation_kl, temp=4.0), logits(), logits()),
        "distillation_mse": (functools.partial(distillation_mse, temp=4.0), values(), values()),
        "squared_cross_entropy": (_squared_cross_entropy, logits(), classes()),
    }[name]
    kwargs = {}
    if isinstance(loss_fn, functools.partial):  # passed as sum_over_tasks' keyword arguments
        loss_fn, kwargs = loss_fn.func, loss_fn.keywords
    outputs.requires_grad_()
    vmapped, real_vmap = [], torch.func.vmap
    monkeypatch.setattr(torch.func, "vmap", lambda *a, **k: vmapped.append(1) or real_vmap(*a, **k))
    total = sum_over_tasks(loss_fn, outputs, targets, **kwargs)
    assert bool(vmapped) == (not one_call and count > 1)
    expected = sum(loss_fn(o, y, **kwargs) for o, y in zip(outputs, targets))
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(total, outputs)[0], torch.autograd.grad(expected, outputs)[0],
                               rtol=1e-12, atol=1e-15)


def test_stacked_support_images_are_folded_once_per_tensor():
    batch, x = TaskBatch(2, Conv4(1, 16, 3, hidden=4)), torch.rand(2, 5, 1, 16, 16)
    folded = batch._folded(x)
    torch.testing.assert_close(folded, fold(x), rtol=0, atol=0)
    assert batch._folded(x) is folded  # every inner step passes the same support images
    assert batch._folded(x.clone()) is not folded
    needs_grad = x.clone().requires_grad_()
    assert batch._folded(needs_grad) is not batch._folded(needs_grad)  # a graph: never reused


def test_exact_batch_norm_swap_is_undone_even_on_error():
    model = _conv_bn()
    with pytest.raises(RuntimeError, match="boom"):
        with exact_batch_norm(model):
            assert type(model[1]) is ExactBatchNorm2d
            raise RuntimeError("boom")
    assert type(model[1]) is nn.BatchNorm2d
    assert not hasattr(model[1], "running_statistics")


# -- dropout under vmap ---------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["maml", "protonet"])
def test_batched_dropout_draws_a_different_mask_for_every_task(algo):
    same = _tasks(count=1) * 3  # three copies of one task: only dropout can tell them apart
    with_dropout = _learner(algo, "conv4", "batched", drop_p=0.5)
    [stack] = meta_batch_outputs(with_dropout, with_dropout.meta_parameters(), None, same)
    students = stack.student.unbind(0)
    assert not torch.allclose(students[0], students[1]) and not torch.allclose(students[1], students[2])
    without = _learner(algo, "conv4", "batched")
    [stack] = meta_batch_outputs(without, without.meta_parameters(), None, same)
    students = stack.student.unbind(0)
    torch.testing.assert_close(students[0], students[1], rtol=1e-12, atol=1e-12)


# -- shapes, configuration, end to end ------------------------------------------------------------

def test_stacked_tasks_keep_their_number_of_classes_when_they_agree():
    tasks = _tasks(count=2)
    assert engines._stacked([dataclasses.replace(t, ways=WAYS) for t in tasks]).ways == WAYS
    assert engines._stacked([dataclasses.replace(tasks[0], ways=WAYS), tasks[1]]).ways is None  # then read
    assert engines._stacked(tasks).support_x.shape == (2, *tasks[0].support_x.shape)


def test_prototypes_with_and_without_the_number_of_classes_agree():
    from simt.algorithms.protonet import prototype_logits
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
    labels = torch.arange(3).repeat_interleave(2)
    torch.testing.assert_close(prototype_logits(support, labels, query, 3), prototype_logits(support, labels, query),
                               rtol=0, atol=0)


def test_batched_engine_needs_tasks_of_one_shape():
    learner = _learner("maml", "conv4", "batched")
    tasks = [_tasks(count=1, queries=2)[0], _tasks(count=1, queries=3)[0]]
    with pytest.raises(ValueError, match=r"algo.engine=batched: the tasks of a meta-batch must have equal shapes"):
        meta_batch_loss(learner, None, tasks)


def test_auto_is_the_loop_on_cpu_and_batched_on_cuda():
    assert resolve_engine("auto", torch.device("cpu")) == "loop"
    assert resolve_engine("auto", torch.device("cuda")) == "batched"
    assert resolve_engine("higher", torch.device("cuda")) == "higher"
    assert pipeline.build(make_cfg(*fast("trainer.device=cpu"))).learner.engine == "loop"
    assert pipeline.build(make_cfg(*fast("algo=protonet", "algo.engine=batched"))).learner.engine == "batched"


def test_invalid_engine_is_a_one_line_config_error():
    with pytest.raises(pipeline.ConfigError) as error:
        pipeline.check_config(make_cfg(*fast("algo.engine=gpu")))
    assert str(error.value) == "algo.engine='gpu': expected one of auto, loop, batched, higher"
    with pytest.raises(ValueError, match="algo.engine='gpu': expected one of auto, loop, batched, higher"):
        _learner("maml", "conv4", "gpu")


def test_cli_trains_with_the_batched_engine(tmp_path):
    result = run_cli(*fast("algo.engine=batched", "simt.drop_p=0.2", f"hydra.run.dir={tmp_path}"))
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["algo"]["engine"] == "batched" and results["config"]["simt"]["enabled"]
