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


class MomentumTarget:
    """The EMA target. `params` holds the averaged entries of θ plus the target's own buffers.

    Args:
        student: θ at step 0 (the target starts as an exact copy and never requires grad).
        keys: which entries of θ are averaged (the learner's `momentum_keys`).
        buffers: state the target keeps for itself (ProtoNet's BN running statistics), copied once.
        eta: η, the momentum; 0 copies the student every step, 1 freezes the target.
        lam: λ, the weight of the distillation term in the outer loss.
        temp: T, the distillation temperature (classification).
        distillation: "kl" (classification) or "mse" (regression).
    """

    def __init__(self, student: Params, keys: list[str], buffers: Params, eta: float, lam: float,
                 temp: float, distillation: str = "kl"):
        self.keys, self.eta, self.lam, self.temp = list(keys), eta, lam, temp
        self.distill = DISTILLATIONS[distillation]
        self.params: Params = {k: student[k].detach().clone() for k in self.keys}
        self.params.update({k: v.detach().clone() for k, v in buffers.items()})

    @torch.no_grad()
    def update(self, student: Params) -> None:
        """θ_m <- η·θ_m + (1-η)·θ, i.e. θ_m + (1-η)·(θ - θ_m); call right after optimizer.step().

        One multi-tensor lerp for every key (exact at η = 0 and η = 1), not two ops per key: a GPU step is
        bound by the ops it dispatches."""
        if self.keys:  # (a foreach op refuses empty lists)
            torch._foreach_lerp_([self.params[key] for key in self.keys], [student[key] for key in self.keys],
                                 1.0 - self.eta)

    def loss(self, task_loss: torch.Tensor, student_out: torch.Tensor,
             teacher_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1-λ)·L_task + λ·D(student, teacher), summed over a stack of tasks: the outputs have a leading task
        dimension and `task_loss` is the sum of their task losses. Returns (total, sum of D) so D can be logged."""
        distill = sum_over_tasks(self.distill, student_out, teacher_out.detach(), temp=self.temp)
        return (1.0 - self.lam) * task_loss + self.lam * distill, distill

    def state_dict(self) -> Params:
        return {k: v.clone() for k, v in self.params.items()}

    def load_state_dict(self, state: Params) -> None:
        for key, value in state.items():
            self.params[key].copy_(value)
