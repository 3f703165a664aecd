"""compat=official against an independent re-derivation of the released SiMT code's formulas (and compat=paper
against the paper's).

The reference side is written here from the formulas alone (README "Fidelity to the official code",
/work/shared/DESIGN.md section 4): plain torch on explicit weight dicts (F.conv2d, BatchNorm from batch means
and biased variances, ReLU, dropout masks from `bernoulli_`, max-pool, a linear head), inner SGD loops by
torch.autograd.grad, prototypes, cross-entropy and KL written out. It never calls the project's learners,
MomentumTarget, engines or trainer. The project's side is `pipeline.build` + `meta_batch_loss`, as training
runs it. Both sides run in float64 on the same weights, tasks and dropout masks (the global RNG seeded
identically before each side); loss parts and every meta-parameter's gradient must agree to a relative
error of 1e-10.

Covered: ProtoNet+SiMT with 20-way episodes and a meta-batch of 3 (official: one embedding pass per
meta-batch, BN statistics shared by its tasks, KL summed over a task's queries; paper: per-task passes, mean
KL), with and without dropout, including the BN running statistics of student and target; MAML+SiMT (second
order; compat changes nothing); ANIL+SiMT (official: the target averages the head only and the teacher runs
the student's current body; paper: the whole network); MetaSGD+SiMT (official: one rate per tensor; paper:
one per weight; the teacher adapts with the target's rates); the acos angular error on hand-checked values;
ProtoNet ResNet-12's dropout switch.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from simt import pipeline
from simt.data.regression import acos_angular_error_degrees, angular_error_degrees
from simt.trainer import meta_batch_loss
from tests.conftest import fast, make_cfg

F64 = torch.float64
RTOL = 1e-10
EPS = 1e-5  # nn.BatchNorm2d's default
BN_MOMENTUM = 0.1  # ProtoNet's standard BatchNorm2d (running statistics)
SEED = 1234  # the global RNG (dropout masks), seeded identically before each side


# -- the independent re-derivation -----------------------------------------------------------------------------

def batch_norm(x, weight, bias, record=None):
    """Training-mode BatchNorm from the batch mean and biased variance over (N, H, W); `record` collects
    (mean, unbiased variance) of the batch, what a running-statistics update uses."""
    mean = x.mean(dim=(0, 2, 3))
    var = (x - mean[None, :, None, None]).pow(2).mean(dim=(0, 2, 3))
    if record is not None:
        n = x.shape[0] * x.shape[2] * x.shape[3]
        record.append((mean.detach().clone(), (var * n / (n - 1)).detach().clone()))
    normalised = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + EPS)
    return normalised * weight[None, :, None, None] + bias[None, :, None, None]


def dropout(x, p):
    """Inverted dropout with a Bernoulli(1-p) mask drawn from the global RNG: one `bernoulli_` over a tensor
    shaped like x, which is the draw PyTorch's CPU dropout makes (so both sides see the same mask)."""
    keep = torch.empty_like(x).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def conv4(w, x, drop_p=0.0, record=None, head=True):
    """The official Conv4: 4 x [conv 3x3 (bias, padding 1) -> BN -> ReLU -> Dropout(p) -> max-pool 2], flatten,
    then a linear head (MAML family) or the flattened features as the embedding (ProtoNet)."""
    for i in range(1, 5):
        pre = f"features.layer{i}."
        x = F.conv2d(x, w[pre + "conv.weight"], w[pre + "conv.bias"], padding=1)
        x = batch_norm(x, w[pre + "norm.weight"], w[pre + "norm.bias"],
                       None if record is None else record.setdefault(i, []))
        x = torch.clamp(x, min=0.0)
        if drop_p > 0:
            x = dropout(x, drop_p)
        x = F.max_pool2d(x, 2)
    x = x.flatten(1)
    return x @ w["classifier.weight"].T + w["classifier.bias"] if head else x


def log_softmax(z):
    return z - torch.logsumexp(z, dim=1, keepdim=True)


def cross_entropy(logits, y):
    """Mean over samples of -log softmax(logits)[y]."""
    return -log_softmax(logits)[torch.arange(len(y)), y].mean()


def kl_summed(student, teacher, temp):
    """T² · Σ_queries KL(softmax(teacher/T) || softmax(student/T)) (the official ProtoNet's reduction='sum')."""
    log_p_teacher, log_p_student = log_softmax(teacher / temp), log_softmax(student / temp)
    return temp**2 * (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum()


def proto_logits(support, support_y, query, ways):
    """-||q - c_k||² to each class mean c_k of the support embeddings."""
    centres = torch.stack([support[support_y == k].mean(dim=0) for k in range(ways)])
    return -(query[:, None, :] - centres[None, :, :]).pow(2).sum(dim=-1)


def protonet_reference(w, wm, tasks, drop_p, lam, temp, shared):
    """ProtoNet+SiMT, official (`shared`: one pass over the meta-batch, KL summed over queries) or paper
    (per-task passes, KL averaged over queries). Returns the loss parts (means over tasks) and the recorded BN
    batch statistics of the student's and the target's passes, in the order the passes ran.

    Dropout draws follow the project's ProtoNet, which draws per meta-batch (shared) or per task (per task), in
    this order: the student's support pass (dropout on), the student's query pass (on), the target's support
    pass (on); the target's query pass has dropout off and draws nothing."""
    student_stats, target_stats = {}, {}
    ways = tasks[0].ways

    def outputs(group):
        xs = torch.cat([t.support_x for t in group])
        xq = torch.cat([t.query_x for t in group])
        s_support = conv4(w, xs, drop_p, student_stats, head=False)
        s_query = conv4(w, xq, drop_p, student_stats, head=False)
        with torch.no_grad():
            t_support = conv4(wm, xs, drop_p, target_stats, head=False)
            t_query = conv4(wm, xq, 0.0, target_stats, head=False)
        results, ns, nq = [], len(group[0].support_x), len(group[0].query_x)
        for i, task in enumerate(group):
            rows_s, rows_q = slice(i * ns, (i + 1) * ns), slice(i * nq, (i + 1) * nq)
            results.append((proto_logits(s_support[rows_s], task.support_y, s_query[rows_q], ways),
                            proto_logits(t_support[rows_s], task.support_y, t_query[rows_q], ways)))
        return results

    pairs = outputs(tasks) if shared else [pair for task in tasks for pair in outputs([task])]
    task_losses, distills = [], []
    for task, (student, teacher) in zip(tasks, pairs):
        task_losses.append(cross_entropy(student, task.query_y))
        d = kl_summed(student, teacher, temp)
        distills.append(d if shared else d / len(task.query_y))
    return _parts(task_losses, distills, lam), student_stats, target_stats


def _parts(task_losses, distills, lam):
    task_loss, distill = torch.stack(task_losses).mean(), torch.stack(distills).mean()
    total = torch.stack([(1 - lam) * t + lam * d for t, d in zip(task_losses, distills)]).mean()
    return {"task_loss": task_loss, "distill_loss": distill, "total": total}


def inner_sgd(w, keys, lrs, x, y, steps, second_order):
    """`steps` SGD steps on the support loss (dropout off): w_k <- w_k - lr_k * dL/dw_k for k in keys."""
    for _ in range(steps):
        loss = cross_entropy(conv4(w, x), y)
        grads = torch.autograd.grad(loss, [w[k] for k in keys], create_graph=second_order)
        w = {**w, **{k: w[k] - lrs[k] * g for k, g in zip(keys, grads)}}
    return w


def gradient_reference(w, teacher_w, adapt_keys, lrs, teacher_lrs, tasks, steps, drop_p, lam, temp):
    """MAML / ANIL / MetaSGD + SiMT, task by task: the student adapts second order (dropout off) and answers the
    query set with dropout p (one draw per task, in task order: the only draws); the teacher adapts
    `teacher_w` first order with `teacher_lrs`, dropout off, no gradient to anything; D is the T²-KL averaged
    over the queries."""
    task_losses, distills = [], []
    for task in tasks:
        adapted = inner_sgd(w, adapt_keys, lrs, task.support_x, task.support_y, steps, second_order=True)
        student = conv4(adapted, task.query_x, drop_p)
        tw = {k: v.detach().requires_grad_() for k, v in teacher_w.items()}
        t_lrs = {k: v.detach() if torch.is_tensor(v) else v for k, v in teacher_lrs.items()}
        t_adapted = inner_sgd(tw, adapt_keys, t_lrs, task.support_x, task.support_y, steps, second_order=False)
        with torch.no_grad():
            teacher = conv4(t_adapted, task.query_x)
        task_losses.append(cross_entropy(student, task.query_y))
        distills.append(kl_summed(student, teacher, temp) / len(task.query_y))
    return _parts(task_losses, distills, lam)


def running_after(initial, records):
    """nn.BatchNorm2d's running-statistics rule r <- (1 - m) r + m s, applied to each batch statistic s in turn."""
    value = initial.clone()
    for s in records:
        value = (1 - BN_MOMENTUM) * value + BN_MOMENTUM * s
    return value


# -- the project's side ---------------------------------------------------------------------------------------

def build(*overrides):
    """A float64 experiment on the synthetic data (tiny Conv4, hidden 8, 16x16x1), one thread."""
    cfg = make_cfg(*fast(*overrides, "trainer.threads=1", "trainer.device=cpu"))
    exp = pipeline.build(cfg)
    exp.learner.model.double()
    if exp.target is not None:
        for key, value in list(exp.target.params.items()):
            if value.is_floating_point():
                exp.target.params[key] = value.to(F64)
    return cfg, exp


def sample_tasks(exp, ways, shots, queries, count, seed=0):
    sampler = exp.dataset.split("train").sampler(ways, shots, queries, seed=seed)
    tasks = [sampler.sample() for _ in range(count)]
    for task in tasks:
        task.support_x, task.query_x = task.support_x.to(F64), task.query_x.to(F64)
    return tasks


def perturb(tensors: dict, keys, scale, seed):
    """Add scale · N(0, 1) noise in place (a target that differs from its student, BN affine away from 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in keys:
            tensors[key].add_(scale * torch.randn(tensors[key].shape, generator=g, dtype=F64))


def project_side(exp, tasks):
    """Loss parts and gradients as training computes them (meta_batch_loss, then autograd)."""
    torch.manual_seed(SEED)
    loss, stats = meta_batch_loss(exp.learner, exp.target, tasks, exp.dataset.metric)
    params = exp.learner.meta_parameters()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    grads = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}
    return {"task_loss": stats["task_loss"], "distill_loss": stats["distill_loss"], "total": loss.item()}, grads


def reference_grads(parts, w):
    grads = torch.autograd.grad(parts["total"], list(w.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(w.items(), grads)}


def relative(value, reference) -> float:
    value, reference = torch.as_tensor(value, dtype=F64), torch.as_tensor(reference, dtype=F64)
    return ((value - reference).norm() / reference.norm()).item()


def compare(parts, grads, ref_parts, ref_grads) -> float:
    """Assert every loss part and every meta-parameter's gradient agree to RTOL; return the largest error.

    A tensor whose exact gradient is zero (a conv bias followed by batch-statistics BN: the normalisation
    cancels it) has only rounding noise on both sides; it is measured against the norm of the whole gradient."""
    worst = 0.0
    for name in ("task_loss", "distill_loss", "total"):
        error = abs(parts[name] - ref_parts[name].item()) / abs(ref_parts[name].item())
        assert error <= RTOL, f"{name}: project {parts[name]!r} vs reference {ref_parts[name].item()!r}"
        worst = max(worst, error)
    assert grads.keys() == ref_grads.keys()
    whole = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
    assert whole > 0
    for key, reference in ref_grads.items():
        scale = reference.norm() if reference.norm() > 1e-8 * whole else whole
        error = ((grads[key] - reference).norm() / scale).item()
        assert error <= RTOL, f"gradient of {key}: relative error {error:.3g}"
        worst = max(worst, error)
    assert ref_parts["distill_loss"].item() > 0  # the teacher differs from the student
    return worst


def leaves(params: dict) -> dict:
    return {k: v.detach().clone().requires_grad_() for k, v in params.items()}


# -- ProtoNet ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("drop_p", [0.0, 0.2], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("compat", ["official", "paper"])
def test_protonet_simt_matches_the_formula(compat, drop_p):
    """20-way episodes, a meta-batch of 3. official: one support pass and one query pass for the whole meta-batch
    (BN batch statistics across its tasks, running statistics updated once per pass), KL summed over queries.
    paper: each task embedded on its own, KL averaged over queries."""
    cfg, exp = build("algo=protonet", f"compat={compat}", f"simt.drop_p={drop_p}", "algo.train_ways=20",
                     "dataset.split_classes.train=24")
    assert exp.learner.shares_batch_statistics == (compat == "official")
    assert exp.target.sum_over_queries == (compat == "official")
    model = exp.learner.model
    norms = [k for k in dict(model.named_parameters()) if ".norm." in k]
    perturb(dict(model.named_parameters()), norms, 0.1, seed=1)  # BN affine away from 1/0
    perturb(exp.target.params, exp.target.keys, 0.05, seed=2)    # the target differs from the student
    tasks = sample_tasks(exp, 20, 1, 5, count=3)
    assert tasks[0].ways == 20

    w = leaves(exp.learner.meta_parameters())
    wm = {k: exp.target.params[k].detach().clone() for k in exp.target.keys}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    target_buffers = {k: exp.target.params[k].clone() for k in buffers}

    parts, grads = project_side(exp, tasks)
    torch.manual_seed(SEED)
    ref_parts, student_stats, target_stats = protonet_reference(w, wm, tasks, drop_p, cfg.simt.lam, cfg.simt.temp,
                                                                shared=compat == "official")
    worst = compare(parts, grads, ref_parts, reference_grads(ref_parts, w))
    print(f"protonet compat={compat} drop_p={drop_p}: largest relative error {worst:.3g}")

    # BN running statistics: official, 2 updates per meta-batch (support pass, query pass) of the student and 2 of
    # the target; paper, 2 per task each.
    passes = 2 if compat == "official" else 2 * len(tasks)
    for side, stats, before, after in (("student", student_stats, buffers, dict(model.named_buffers())),
                                       ("target", target_stats, target_buffers, exp.target.params)):
        for layer, records in stats.items():
            assert len(records) == passes
            pre = f"features.layer{layer}.norm."
            for i, name in enumerate(("running_mean", "running_var")):
                expected = running_after(before[pre + name], [r[i] for r in records])
                error = relative(after[pre + name], expected)
                assert error <= RTOL, f"{side} {pre + name}: relative error {error:.3g}"
            assert int(after[pre + "num_batches_tracked"]) == int(before[pre + "num_batches_tracked"]) + passes


def test_protonet_official_differs_from_paper():
    """The two compat modes give different losses on the same weights and tasks (the switches do something):
    the official distillation term is about `queries` times the paper's."""
    results = {}
    for compat in ("official", "paper"):
        _, exp = build("algo=protonet", f"compat={compat}", "simt.drop_p=0.0", "algo.train_ways=20",
                       "dataset.split_classes.train=24")
        perturb(exp.target.params, exp.target.keys, 0.05, seed=2)
        results[compat], _ = project_side(exp, sample_tasks(exp, 20, 1, 5, count=3))
    ratio = results["official"]["distill_loss"] / results["paper"]["distill_loss"]
    assert 20 < ratio < 500  # 100 queries a task; the shared BN statistics move it a little
    assert results["official"]["task_loss"] != results["paper"]["task_loss"]  # BN statistics across tasks


# -- MAML family --------------------------------------------------------------------------------------------------

GRADIENT_OVERRIDES = ("algo.inner_steps=2", "algo.inner_lr=0.1", "task.ways=5")
WAYS, SHOTS, QUERIES, TASKS = 5, 2, 3, 2


def _gradient_case(algo, compat, drop_p=0.2):
    cfg, exp = build(f"algo={algo}", f"compat={compat}", f"simt.drop_p={drop_p}", *GRADIENT_OVERRIDES)
    model = exp.learner.model
    params = dict(model.named_parameters())
    norms = [k for k in params if ".norm." in k]
    perturb(params, norms, 0.1, seed=1)  # the student's BN affine, which the teacher borrows, away from 1/0
    return cfg, exp, norms


def _teacher_weights(exp, student_w):
    """The teacher's starting weights: the target's averaged entries, the student's for everything it does not
    average (BN affine always; under the official ANIL, the whole body)."""
    return {k: (exp.target.params[k] if k in exp.target.params else v).detach().clone()
            for k, v in student_w.items()}


def _matches_reference(cfg, exp, adapted: list[str], case: str):
    """The project's loss parts and gradients equal the re-derivation's, every key of `adapted` adapted with the
    learner's rate; returns (parts, weights, teacher weights, tasks, rates) for the caller's further checks."""
    perturb(exp.target.params, exp.target.keys, 0.05, seed=2)
    tasks = sample_tasks(exp, WAYS, SHOTS, QUERIES, TASKS)
    w = leaves(exp.learner.meta_parameters())
    teacher_w = _teacher_weights(exp, w)
    parts, grads = project_side(exp, tasks)
    torch.manual_seed(SEED)
    lrs = {k: cfg.algo.inner_lr for k in adapted}
    ref = gradient_reference(w, teacher_w, adapted, lrs, lrs, tasks, cfg.algo.inner_steps, cfg.simt.drop_p,
                             cfg.simt.lam, cfg.simt.temp)
    worst = compare(parts, grads, ref, reference_grads(ref, w))
    print(f"{case}: largest relative error {worst:.3g}")
    return parts, w, teacher_w, tasks, lrs


@pytest.mark.parametrize("compat", ["official", "paper"])
def test_maml_simt_matches_the_formula(compat):
    """Second-order MAML + SiMT (compat changes nothing for it): adapt conv and linear weights, not BN affine;
    the target averages them and borrows the student's BN affine."""
    cfg, exp, norms = _gradient_case("maml", compat)
    adapt_keys = [k for k in exp.learner.meta_parameters() if k not in norms]
    assert exp.learner.adapt_keys == adapt_keys and exp.target.keys == adapt_keys
    _matches_reference(cfg, exp, adapt_keys, f"maml compat={compat}")


@pytest.mark.parametrize("compat", ["official", "paper"])
def test_anil_simt_matches_the_formula(compat):
    """ANIL + SiMT. official: the target averages the head only and the teacher adapts that averaged head on top of
    the STUDENT's current body; paper: the target averages the whole network (all but BN affine) and the teacher
    runs its own body. The target's head (and, under paper, body) differs from the student's."""
    cfg, exp, norms = _gradient_case("anil", compat)
    head = ["classifier.weight", "classifier.bias"]
    assert exp.learner.adapt_keys == head
    body = [k for k in exp.learner.meta_parameters() if k not in norms and k not in head]
    assert exp.target.keys == (head if compat == "official" else body + head)
    parts, w, teacher_w, tasks, lrs = _matches_reference(cfg, exp, head, f"anil compat={compat}")
    if compat == "official":
        assert all(torch.equal(teacher_w[k], w[k]) for k in body)
        assert not torch.equal(teacher_w["classifier.weight"], w["classifier.weight"])
        # The test tells the two teachers apart: a teacher on the averaged body would differ.
        for key in body:
            teacher_w[key] = teacher_w[key] + 0.05 * torch.randn(teacher_w[key].shape, dtype=F64,
                                                               generator=torch.Generator().manual_seed(3))
        torch.manual_seed(SEED)
        other = gradient_reference(w, teacher_w, head, lrs, lrs, tasks, cfg.algo.inner_steps, cfg.simt.drop_p,
                                   cfg.simt.lam, cfg.simt.temp)
        assert abs(other["distill_loss"].item() - parts["distill_loss"]) > 1e3 * RTOL * parts["distill_loss"]


@pytest.mark.parametrize("compat", ["official", "paper"])
def test_metasgd_simt_matches_the_formula(compat):
    """MetaSGD + SiMT. official: one learned inner rate per tensor; paper: one per weight. The target averages
    the rates with the weights and the teacher adapts with the target's rates (made to differ here); the rates'
    meta-gradients are compared with the weights'."""
    cfg, exp, norms = _gradient_case("metasgd", compat)
    learner = exp.learner
    adapt_keys = learner.adapt_keys
    params = dict(learner.model.named_parameters())
    g = torch.Generator().manual_seed(4)
    # Student rates in float64, different per tensor (and per weight under paper): leaves the outer loop trains.
    learner.inner_lrs = {
        key: (cfg.algo.inner_lr * (1 + 0.5 * torch.rand(() if compat == "official" else params[key].shape,
                                                        generator=g, dtype=F64))).requires_grad_()
        for key in adapt_keys}
    lr_keys = [f"inner_lr.{k}" for k in adapt_keys]
    assert exp.target.keys == adapt_keys + lr_keys
    for key in adapt_keys:  # the target's rates: shaped as the student's, different values
        rate = learner.inner_lrs[key]
        assert rate.shape == (() if compat == "official" else params[key].shape)
        exp.target.params[f"inner_lr.{key}"] = rate.detach() * (0.6 + 0.2 * torch.rand(rate.shape, generator=g,
                                                                                      dtype=F64))
    perturb(exp.target.params, adapt_keys, 0.05, seed=2)
    tasks = sample_tasks(exp, WAYS, SHOTS, QUERIES, TASKS)
    w = leaves(learner.meta_parameters())
    model_w = {k: v for k, v in w.items() if not k.startswith("inner_lr.")}
    teacher_w = _teacher_weights(exp, model_w)
    lrs = {k: w[f"inner_lr.{k}"] for k in adapt_keys}
    teacher_lrs = {k: exp.target.params[f"inner_lr.{k}"].clone() for k in adapt_keys}
    parts, grads = project_side(exp, tasks)
    torch.manual_seed(SEED)
    ref = gradient_reference(model_w, teacher_w, adapt_keys, lrs, teacher_lrs, tasks, cfg.algo.inner_steps,
                             cfg.simt.drop_p, cfg.simt.lam, cfg.simt.temp)
    ref_grads = reference_grads(ref, w)
    assert all(ref_grads[k].norm() > 0 for k in lr_keys)
    worst = compare(parts, grads, ref, ref_grads)
    print(f"metasgd compat={compat}: largest relative error {worst:.3g}")


# -- ShapeNet1D's angular error, ResNet-12's dropout switch ------------------------------------------------------

def _unit(degrees):
    radians = math.radians(degrees)
    return [math.cos(radians), math.sin(radians)]


@pytest.mark.parametrize("output,target_degrees,expected", [
    ((0.0, -0.5), 270.0, 0.0),            # acos(0) = 90°, sine negative: 360° - 90° = 270°
    ((0.0, 0.5), 90.0, 0.0),              # sine positive: 90° as it is
    ((0.5, 0.5), 0.0, 60.0),              # acos(0.5) = 60° (atan2 of the same output would say 45°)
    ((0.5, -0.01), 0.0, 60.0),            # 300° vs 0°: the shorter way round
    ((-1.0, 0.0), 350.0, 170.0),          # sine 0 is not negative: 180°
    ((0.8, -0.1), 10.0, math.degrees(math.acos(0.8)) + 10.0),  # 323.13° vs 10°: 46.87° the shorter way
    ((math.cos(math.radians(10.0)), -0.3), 5.0, 15.0),   # 350° vs 5°: across 0°
    ((math.cos(math.radians(100.0)), 0.2), 300.0, 160.0),  # 100° vs 300°: 200° one way, 160° the other
])
def test_acos_angular_error_on_hand_checked_values(output, target_degrees, expected):
    pred = torch.tensor([output], dtype=F64)
    target = torch.tensor([_unit(target_degrees)], dtype=F64)
    assert acos_angular_error_degrees(pred, target).item() == pytest.approx(expected, abs=1e-9)


def test_acos_equals_atan2_on_unit_outputs_only():
    angles = torch.linspace(0, 2 * math.pi, 37, dtype=F64)[:-1]
    unit = torch.stack([angles.cos(), angles.sin()], dim=1)
    targets = torch.roll(unit, 5, dims=0)
    torch.testing.assert_close(acos_angular_error_degrees(unit, targets), angular_error_degrees(unit, targets),
                               rtol=0, atol=1e-9)
    shrunk = unit * torch.tensor([0.5, 1.0], dtype=F64)  # not unit: the cosine alone gives another angle
    assert not torch.allclose(acos_angular_error_degrees(shrunk, targets), angular_error_degrees(shrunk, targets))


@pytest.mark.parametrize("compat,angle", [("official", "acos"), ("paper", "atan2")])
def test_shapenet1d_angle_follows_compat(compat, angle):
    assert make_cfg("dataset=shapenet1d", f"compat={compat}").dataset.angle == angle


@pytest.mark.parametrize("compat,dropout_layers", [("official", False), ("paper", True)])
def test_protonet_resnet12_dropout_follows_compat(compat, dropout_layers):
    from simt.models import ResNet12

    cfg = make_cfg("algo=protonet", "backbone=resnet12", f"compat={compat}", "simt.drop_p=0.3")
    assert cfg.backbone.embedding_dropout is (compat == "paper")
    model = ResNet12(1, 16, None, widths=(2, 2, 2, 2), drop_p=0.3, embedding_dropout=cfg.backbone.embedding_dropout)
    active = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    assert active is dropout_layers
