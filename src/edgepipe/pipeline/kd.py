"""Knowledge-distillation losses and adaptive schedules (pure torch, no I/O).

- `kd_loss`: KL(teacher_T || student_T) * T^2 (Hinton et al., 2015), per sample or averaged.
- `hidden_loss`: MSE between mapped hidden states, through a learned projection when widths differ
  (FitNets, Romero et al., 2015; TinyBERT, Jiao et al., 2020).
- `feature_loss`: the same for CNN feature maps, through a 1x1 convolution when channels differ.
- `attention_loss`: MSE between attention probability maps (TinyBERT), when head counts match.
- `annealed_temperature`: Annealing KD (Jafari et al., EACL 2021): the temperature falls linearly
  from its start value to 1 over training, so early steps see smoothed targets and late steps sharp ones.
- `wsl_weights`: weighted soft labels (Zhou et al., ICLR 2021, "Rethinking soft labels for knowledge
  distillation: a bias-variance tradeoff perspective"): per sample, w = 1 - exp(-CE_student / CE_teacher),
  so KD counts most where the teacher fits the label better than the student does, and little where
  the teacher is itself wrong or unsure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, reduce: bool = True
) -> torch.Tensor:
    """Hinton KD term: KL(p_teacher^T || p_student^T) scaled by T^2 so gradients keep their size."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    per_sample = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1) * temperature**2
    return per_sample.mean() if reduce else per_sample


def hidden_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    mask: torch.Tensor,
    projections: torch.nn.ModuleList | None = None,
) -> torch.Tensor:
    """Mean over mapped pairs of the token-averaged MSE; padding positions are ignored."""
    weights = mask.unsqueeze(-1).to(student[0].dtype)
    total = student[0].new_zeros(())
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if projections is not None:
            s = projections[i](s)
        sq = ((s - t) ** 2) * weights
        total = total + sq.sum() / (weights.sum() * t.shape[-1])
    return total / len(student)


def attention_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """MSE between attention maps (batch, heads, query, key), counting real query positions only."""
    weights = mask[:, None, :, None].to(student[0].dtype)
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        total = total + (((s - t) ** 2) * weights).sum() / (weights.sum() * s.shape[1] * s.shape[-1])
    return total / len(student)


def annealed_temperature(start: float, step: int, total_steps: int) -> float:
    """Linear from `start` at step 0 to 1.0 at the last step (Annealing KD)."""
    if total_steps <= 1:
        return 1.0
    progress = min(max(step / (total_steps - 1), 0.0), 1.0)
    return start + (1.0 - start) * progress


def wsl_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample KD weights in [0, 1): 1 - exp(-CE_student / CE_teacher) (weighted soft labels)."""
    ce_student = F.cross_entropy(student_logits.detach(), labels, reduction="none")
    ce_teacher = F.cross_entropy(teacher_logits, labels, reduction="none")
    return 1.0 - torch.exp(-ce_student / ce_teacher.clamp_min(1e-6))


def feature_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], projections: torch.nn.ModuleList | None = None
) -> torch.Tensor:
    """Mean over mapped pairs of the MSE between CNN feature maps (batch, channels, h, w); a 1x1
    convolution maps student channels to the teacher's when they differ (FitNets)."""
    total = student[0].new_zeros(())
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if projections is not None:
            s = projections[i](s)
        total = total + F.mse_loss(s, t)
    return total / len(student)
