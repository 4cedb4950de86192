"""Knowledge-distillation losses and adaptive schedules (pure torch, no I/O).

- `kd_loss`: KL(teacher_T || student_T) * T^2 (Hinton et al., 2015), per sample or averaged.
- `divergence` / `distribution_loss`: forward KL, reverse KL or JSD per position / masked mean
  (language-model distillation; `kd_loss` is its forward KL).
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
    per_sample = divergence(student_logits, teacher_logits, "forward_kl", temperature)
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


DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "jsd")  # the `kind` of divergence


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, temperature: float = 1.0
) -> torch.Tensor:
    """A divergence between teacher and student distributions over the last axis, per position, times T^2.

    With p_t = softmax(teacher / T) and p_s = softmax(student / T):
    - "forward_kl": KL(p_t || p_s) = sum p_t (log p_t - log p_s), the Hinton term; mode-covering.
    - "reverse_kl": KL(p_s || p_t) = sum p_s (log p_s - log p_t); mode-seeking, so a small student does
      not spread mass over tokens the teacher finds unlikely (MiniLLM, Gu et al., ICLR 2024).
    - "jsd": 0.5 KL(p_t || m) + 0.5 KL(p_s || m) with m = (p_t + p_s) / 2; symmetric, and at most
      ln 2 before the T^2 (the beta = 0.5 generalized JSD of GKD, Agarwal et al., ICLR 2024).
    The T^2 keeps gradients their size across temperatures.
    """
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if kind == "forward_kl":
        per_position = _kl(log_t, log_s)
    elif kind == "reverse_kl":
        per_position = _kl(log_s, log_t)
    elif kind == "jsd":
        # log m through logaddexp: a probability that underflows to 0 in one model must not give log(0)
        log_m = torch.logaddexp(log_t, log_s) - torch.log(log_t.new_tensor(2.0))
        per_position = 0.5 * _kl(log_t, log_m) + 0.5 * _kl(log_s, log_m)
    else:
        from edgepipe.errors import InputError  # kd.py imports only torch at module level

        raise InputError(f"`kind`: unknown divergence {kind!r}; use one of {', '.join(DIVERGENCE_KINDS)}")
    return per_position * temperature**2


def distribution_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`divergence` averaged over the positions `mask` (the logits' shape without the vocabulary axis)
    marks, or over all of them: the language-model distillation term."""
    per_position = divergence(student_logits, teacher_logits, kind, temperature)
    if mask is None:
        return per_position.mean()
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0)
