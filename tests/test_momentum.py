"""SiMT's momentum target and distillation loss."""
import pytest
import torch
import torch.nn.functional as F

from simt.momentum import WARMUP_GAMMA, MomentumTarget, distillation_kl, distillation_mse, momentum_at
from simt.trainer import meta_batch_loss
from tests.conftest import FAST, make_cfg
from simt import pipeline


def _student():
    torch.manual_seed(0)
    return {"w": torch.randn(3, 4, requires_grad=True), "b": torch.randn(3, requires_grad=True)}


def test_target_starts_equal_and_never_requires_grad():
    student = _student()
    target = MomentumTarget(student, ["w", "b"], {}, eta=0.9, lam=0.5, temp=4.0)
    for key in student:
        assert torch.equal(target.params[key], student[key])
        assert not target.params[key].requires_grad
        assert target.params[key].data_ptr() != student[key].data_ptr()


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.995, 1.0])
def test_ema_formula(eta):
    student = _student()
    target = MomentumTarget(student, ["w", "b"], {}, eta=eta, lam=0.5, temp=4.0)
    before = {k: v.clone() for k, v in target.params.items()}
    with torch.no_grad():
        for value in student.values():
            value.add_(1.0)
    target.update(student, step=1)
    for key in student:
        expected = eta * before[key] + (1 - eta) * student[key].detach()
        torch.testing.assert_close(target.params[key], expected, rtol=0, atol=1e-6)
    if eta == 0.0:
        assert all(torch.equal(target.params[k], student[k].detach()) for k in student)
    if eta == 1.0:
        assert all(torch.equal(target.params[k], before[k]) for k in student)


@pytest.mark.parametrize("step,expected", [  # (1 - 1/t)^7.94, worked out by hand to 4 digits
    (1, 0.0),            # the first update copies the student
    (2, 0.004072),       # 0.5^7.94
    (10, 0.4332),        # 0.9^7.94
    (100, 0.9233),       # 0.99^7.94: averages about the last tenth of the run
    (1584, 0.994999),    # just below η = 0.995
    (1585, 0.995), (10**9, 0.995),  # from there on, η itself
])
def test_warmup_momentum_at_known_steps(step, expected):
    assert momentum_at(step, 0.995, "warmup") == pytest.approx(expected, rel=2e-4, abs=1e-9)
    assert momentum_at(step, 0.995, "constant") == 0.995


def test_warmup_momentum_rises_to_eta_and_stays():
    values = [momentum_at(step, 0.97, "warmup") for step in range(1, 2000)]
    assert values == sorted(values) and values[0] == 0.0 and values[-1] == 0.97
    assert values.index(0.97) + 1 == 262  # (γ+1)/(1-η) = 265, about


def test_a_constant_schedule_is_the_plain_ema_bit_for_bit():
    student, reference = _student(), {k: v.detach().clone() for k, v in _student().items()}
    target = MomentumTarget(student, ["w", "b"], {}, eta=0.995, lam=0.5, temp=4.0, eta_schedule="constant")
    for step in range(1, 6):
        with torch.no_grad():
            for value in student.values():
                value.mul_(1.1).add_(0.3)
        target.update(student, step=step)
        reference = {k: torch.lerp(v, student[k].detach(), 1.0 - 0.995) for k, v in reference.items()}
        assert all(torch.equal(target.params[k], reference[k]) for k in reference)


def test_warmup_uses_the_steps_momentum():
    student = _student()
    target = MomentumTarget(student, ["w", "b"], {}, eta=0.995, lam=0.5, temp=4.0, eta_schedule="warmup")
    with torch.no_grad():
        student["w"].add_(1.0)
    target.update(student, step=1)
    assert torch.equal(target.params["w"], student["w"].detach())  # η_1 = 0
    before = target.params["w"].clone()
    with torch.no_grad():
        student["w"].add_(1.0)
    target.update(student, step=10)
    eta = momentum_at(10, 0.995, "warmup")
    torch.testing.assert_close(target.params["w"], eta * before + (1 - eta) * student["w"].detach(), rtol=0, atol=1e-6)


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="simt.eta_schedule='nope': expected one of constant, warmup"):
        MomentumTarget(_student(), ["w"], {}, eta=0.9, lam=0.5, temp=4.0, eta_schedule="nope")
    with pytest.raises(pipeline.ConfigError, match="simt.eta_schedule='nope': expected one of constant, warmup"):
        pipeline.check_config(make_cfg(*FAST, "simt.eta_schedule=nope"))


def test_only_listed_keys_are_averaged_and_buffers_are_kept():
    student = _student()
    buffers = {"running_mean": torch.zeros(3)}
    target = MomentumTarget(student, ["w"], buffers, eta=0.0, lam=0.5, temp=4.0)
    assert set(target.params) == {"w", "running_mean"}
    with torch.no_grad():
        student["w"].add_(1.0)
    target.update(student, step=1)
    assert torch.equal(target.params["w"], student["w"].detach())
    assert torch.equal(target.params["running_mean"], torch.zeros(3))


def test_kl_is_zero_for_equal_logits_and_scales_with_t_squared():
    logits = torch.randn(10, 5)
    assert distillation_kl(logits, logits.clone(), temp=4.0).abs().item() < 1e-6
    student, teacher = torch.randn(10, 5), torch.randn(10, 5)
    for temp in (1.0, 2.0, 4.0):
        reference = F.kl_div(F.log_softmax(student / temp, 1), F.softmax(teacher / temp, 1),
                             reduction="batchmean")
        torch.testing.assert_close(distillation_kl(student, teacher, temp), reference * temp**2)


def test_mse_distillation():
    a, b = torch.randn(6, 2), torch.randn(6, 2)
    torch.testing.assert_close(distillation_mse(a, b, 4.0), ((a - b) ** 2).mean())


@pytest.mark.parametrize("distillation", ["kl", "mse"])
def test_the_loss_of_a_stack_of_tasks_is_the_sum_of_their_losses(distillation):
    """MomentumTarget.loss takes the outputs of tasks run together (leading task dimension) and the sum of
    their task losses, and returns the sums of the per-task totals and distillations."""
    g = torch.Generator().manual_seed(0)
    target = MomentumTarget(_student(), ["w", "b"], {}, eta=0.9, lam=0.3, temp=4.0, distillation=distillation)
    student_out, teacher_out = (torch.randn(3, 7, 4, generator=g, dtype=torch.float64) for _ in range(2))
    task_losses = torch.rand(3, generator=g, dtype=torch.float64)
    total, distill = target.loss(task_losses.sum(), student_out, teacher_out)
    per_task = [target.loss(loss, s[None], t[None]) for loss, s, t in zip(task_losses, student_out, teacher_out)]
    torch.testing.assert_close(total, sum(t for t, _ in per_task), rtol=1e-12, atol=0)
    torch.testing.assert_close(distill, sum(d for _, d in per_task), rtol=1e-12, atol=0)
    torch.testing.assert_close(distill, sum(target.distill(s, t, 4.0) for s, t in zip(student_out, teacher_out)),
                               rtol=1e-12, atol=0)


def test_distillation_gradient_reaches_the_student_only():
    student = _student()
    target = MomentumTarget(student, ["w", "b"], {}, eta=0.9, lam=1.0, temp=4.0)
    x = torch.randn(7, 4)
    teacher_params = {k: v.clone().requires_grad_() for k, v in target.params.items()}
    student_out = x @ student["w"].T + student["b"]
    teacher_out = x @ teacher_params["w"].T + teacher_params["b"]
    total, distill = target.loss(torch.tensor(0.0), student_out[None], teacher_out[None] + 1.0)  # a stack of 1 task
    total.backward()
    assert student["w"].grad is not None and student["w"].grad.abs().sum() > 0
    assert teacher_params["w"].grad is None


@pytest.mark.parametrize("algo", ["maml", "protonet"])
def test_simt_disabled_gives_exactly_the_baseline_loss(algo):
    cfg = make_cfg(*FAST, f"algo={algo}", "simt.enabled=false")
    exp = pipeline.build(cfg)
    assert exp.target is None
    sampler = exp.dataset.split("train").sampler(pipeline.train_ways(cfg), 1, 3, seed=0)
    tasks = [sampler.sample() for _ in range(2)]
    torch.manual_seed(0)
    loss, stats = meta_batch_loss(exp.learner, None, tasks)
    torch.manual_seed(0)
    theta = exp.learner.meta_parameters()
    manual = sum(exp.learner.task_loss(exp.learner.student_outputs(theta, t), t.query_y) for t in tasks) / 2
    assert torch.equal(loss, manual)
    assert stats["distill_loss"] == 0.0


def test_simt_loss_mixes_task_and_distillation():
    cfg = make_cfg(*FAST, "simt.lam=0.25")
    exp = pipeline.build(cfg)
    task = exp.dataset.split("train").sampler(5, 1, 3, seed=0).sample()
    loss, stats = meta_batch_loss(exp.learner, exp.target, [task])
    assert loss.item() == pytest.approx(0.75 * stats["task_loss"] + 0.25 * stats["distill_loss"], rel=1e-5)
    assert stats["distill_loss"] >= 0.0


def _task_of(exp, ways=5):
    return exp.dataset.split("train").sampler(ways, 1, 3, seed=0).sample()


def test_simt_with_zero_weight_and_no_dropout_equals_the_baseline_bitwise():
    on = pipeline.build(make_cfg(*FAST, "simt.lam=0", "simt.drop_p=0"))
    off = pipeline.build(make_cfg(*FAST, "simt.enabled=false"))
    tasks = [_task_of(on) for _ in range(2)]
    loss_on, _ = meta_batch_loss(on.learner, on.target, tasks)
    loss_off, _ = meta_batch_loss(off.learner, None, tasks)
    assert torch.equal(loss_on, loss_off)


def test_dropout_perturbs_only_the_students_query_pass():
    exp = pipeline.build(make_cfg(*FAST, "simt.drop_p=0.5"))
    learner, task = exp.learner, _task_of(exp)
    theta = learner.meta_parameters()
    adapted = [learner.adapt(theta, task, 2, first_order=True) for _ in range(2)]
    assert all(torch.equal(adapted[0][k], adapted[1][k]) for k in adapted[0])  # inner loop: no dropout
    assert torch.equal(learner.teacher_outputs(exp.target.params, task),
                       learner.teacher_outputs(exp.target.params, task))
    assert not torch.equal(learner.student_outputs(theta, task), learner.student_outputs(theta, task))
    assert torch.equal(learner.eval_outputs(theta, task), learner.eval_outputs(theta, task))


def test_teacher_gets_no_gradient_and_the_student_does():
    exp = pipeline.build(make_cfg(*FAST, "simt.lam=1.0"))
    task = _task_of(exp)
    assert exp.learner.teacher_outputs(exp.target.params, task).grad_fn is None
    loss, _ = meta_batch_loss(exp.learner, exp.target, [task])
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in exp.target.params.values())
    assert exp.learner.model.classifier.weight.grad.abs().sum() > 0


def test_momentum_keys_skip_bn_affine_and_cover_metasgd_rates():
    exp = pipeline.build(make_cfg(*FAST, "algo=metasgd"))
    keys = exp.learner.momentum_keys
    assert not any(".norm." in key for key in keys)
    assert {k for k in keys if k.startswith("inner_lr.")} == {"inner_lr." + k for k in exp.learner.adapt_keys}
    assert set(exp.target.params) == set(keys)


def test_teacher_adapts_with_the_averaged_rates():
    exp = pipeline.build(make_cfg(*FAST, "algo=metasgd"))
    task = _task_of(exp)
    for key in exp.target.params:
        if key.startswith("inner_lr."):
            exp.target.params[key].zero_()  # zero rates: the teacher's adaptation is the identity
    with torch.no_grad():
        unadapted = exp.learner._forward(exp.target.params, task.query_x)
    assert torch.equal(exp.learner.teacher_outputs(exp.target.params, task), unadapted)


def test_protonet_teacher_updates_its_own_bn_statistics_only():
    exp = pipeline.build(make_cfg(*FAST, "algo=protonet"))
    key = "features.layer1.norm.running_mean"
    student_before = dict(exp.learner.model.named_buffers())[key].clone()
    target_before = exp.target.params[key].clone()
    exp.learner.teacher_outputs(exp.target.params, _task_of(exp, ways=20))
    assert not torch.equal(exp.target.params[key], target_before)
    assert torch.equal(dict(exp.learner.model.named_buffers())[key], student_before)


def test_a_target_with_nothing_to_average_keeps_its_buffers():
    student = {"w": torch.ones(2)}
    target = MomentumTarget(student, [], {"running_mean": torch.zeros(3)}, eta=0.5, lam=0.5, temp=4.0)
    target.update(student, step=1)
    assert set(target.params) == {"running_mean"} and torch.equal(target.params["running_mean"], torch.zeros(3))
