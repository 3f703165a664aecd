"""SiMT's momentum target and distillation loss (Tack et al., NeurIPS 2022, Sec. 3).

The target θ_m is an exponential moving average of the meta-model θ, updated after every outer step
(paper eq. 3): θ_m <- η·θ_m + (1-η)·θ. Adapted to each task, it provides soft targets that the adapted
student is distilled towards (eq. 4): L = (1-λ)·L_task + λ·D(student, teacher). It is just another params
dict, so one implementation serves every learner.
"""
import torch
import torch.nn.functional as F

from simt.algorithms.inner_loop import Params
from simt.losses import sum_over_tasks


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) || softmax(student/T)), averaged over query samples (rows).

    The T² factor keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015).
    """
    log_student = F.log_softmax(student_logits / temp, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temp, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="sum", log_target=True)
    return kl * temp**2 / student_logits.shape[0]


distillation_kl.mean_over_samples = True  # type: ignore[attr-defined]  # (simt.losses.sum_over_tasks)


def distillation_mse(student_outputs: torch.Tensor, teacher_outputs: torch.Tensor, temp: float) -> torch.Tensor:
    """Regression: the mean squared difference to the teacher's predictions (temperature unused)."""
    return F.mse_loss(student_outputs, teacher_outputs)


distillation_mse.mean_over_samples = True  # type: ignore[attr-defined]


DISTILLATIONS = {"kl": distillation_kl, "mse": distillation_mse}
ETA_SCHEDULES = ("constant", "warmup")
# γ of the power-function profile (Karras et al.): 6.94 makes the average's relative width σ_rel = 0.10, i.e. the
# target averages roughly the last tenth of the steps taken so far.
WARMUP_GAMMA = 6.94


def momentum_at(step: int, eta: float, schedule: str) -> float:
    """η_t, the momentum of the update after outer step `step` (1, 2, ...).

    `constant`: η at every step (the paper and the official code). `warmup`: the power-function EMA of Karras
    et al. (2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3.1),
    η_t = (1 - 1/t)^(γ+1), capped at η: from step 1 (η_1 = 0, the target is the student) it averages a fixed
    fraction of the run so far, until η_t reaches η (step 1,585 for η = 0.995, about (γ+1)/(1-η)) and stays
    there. Chosen over Mean Teacher's min(η, 1 - 1/(t+1)), which weighs every step so far equally and so
    lags half the run behind, and over timm's 1 - (1 + t/γ)^-p, whose two constants are tuned for runs of
    tens of thousands of steps. A function of the step alone, so a resumed run continues it exactly.
    """
    if schedule == "constant":
        return eta
    return min(eta, (1.0 - 1.0 / step) ** (WARMUP_GAMMA + 1))


class MomentumTarget:
    """The EMA target. `params` holds the averaged entries of θ plus the target's own buffers.

    Args:
        student: θ at step 0 (the target starts as an exact copy and never requires grad).
        keys: which entries of θ are averaged (the learner's `momentum_keys`).
        buffers: state the target keeps for itself (ProtoNet's BN running statistics), copied once.
        eta: η, the momentum; 0 copies the student every step, 1 freezes the target.
        eta_schedule: "constant" (η at every step) or "warmup" (η_t grows to η: `momentum_at`).
        lam: λ, the weight of the distillation term in the outer loss.
        temp: T, the distillation temperature (classification).
        distillation: "kl" (classification) or "mse" (regression).
        per_task_distillation: D of one task is the "mean" over its queries (the paper; the official MAML code)
            or their "sum" (the official ProtoNet code: at 5-way x 15 queries, 75 times the weight of λ).
    """

    def __init__(self, student: Params, keys: list[str], buffers: Params, eta: float, lam: float,
                 temp: float, distillation: str = "kl", eta_schedule: str = "constant",
                 per_task_distillation: str = "mean"):
        if eta_schedule not in ETA_SCHEDULES:
            raise ValueError(f"simt.eta_schedule={eta_schedule!r}: expected one of {', '.join(ETA_SCHEDULES)}")
        if per_task_distillation not in ("mean", "sum"):
            raise ValueError(f"per_task_distillation={per_task_distillation!r}: expected mean or sum")
        self.sum_over_queries = per_task_distillation == "sum"
        self.keys, self.eta, self.lam, self.temp, self.eta_schedule = list(keys), eta, lam, temp, eta_schedule
        self.distill = DISTILLATIONS[distillation]
        self.params: Params = {k: student[k].detach().clone() for k in self.keys}
        self.params.update({k: v.detach().clone() for k, v in buffers.items()})

    @torch.no_grad()
    def update(self, student: Params, step: int) -> None:
        """θ_m <- η_t·θ_m + (1-η_t)·θ, i.e. θ_m + (1-η_t)·(θ - θ_m); call right after optimizer step `step`.

        One multi-tensor lerp for every key (exact at η = 0 and η = 1), not two ops per key: a GPU step is
        bound by the ops it dispatches."""
        if self.keys:  # (a foreach op refuses empty lists)
            torch._foreach_lerp_([self.params[key] for key in self.keys], [student[key] for key in self.keys],
                                 1.0 - momentum_at(step, self.eta, self.eta_schedule))

    def loss(self, task_loss: torch.Tensor, student_out: torch.Tensor,
             teacher_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1-λ)·L_task + λ·D(student, teacher), summed over a stack of tasks: the outputs have a leading task
        dimension and `task_loss` is the sum of their task losses. Returns (total, sum of D) so D can be logged."""
        distill = sum_over_tasks(self.distill, student_out, teacher_out.detach(), temp=self.temp)
        if self.sum_over_queries:  # every task of a stack has as many queries: the sum is the mean times them
            distill = distill * student_out.shape[1]
        return (1.0 - self.lam) * task_loss + self.lam * distill, distill

    def state_dict(self) -> Params:
        return {k: v.clone() for k, v in self.params.items()}

    def load_state_dict(self, state: Params) -> None:
        for key, value in state.items():
            self.params[key].copy_(value)
