"""Losses of the student: knowledge distillation from the teacher's logits, and cross-entropy.

All losses are over the *shifted* next-token positions (position t predicts token t+1), with
padding (label -100) masked out, and averaged over the real tokens, not over the batch.
Computation is in float32 whatever the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")


def shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Logits at positions that predict a real next token: ``[n, V]``, their targets ``[n]``,
    and the boolean mask ``[B, T-1]`` that selected them."""
    mask = labels[:, 1:] != -100
    return logits[:, :-1][mask], labels[:, 1:][mask], mask


def ce_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    logits, targets, _ = shifted(student_logits, labels)
    return F.cross_entropy(logits.float(), targets, reduction="mean")


def kd_token_loss(student: Tensor, teacher: Tensor, loss: str = "forward_kl", temperature: float = 1.0) -> Tensor:
    """Per-token divergence ``[n]`` between ``[n, V]`` logits, scaled by T^2 (Hinton et al.)."""
    if loss not in KD_LOSSES:
        raise ValueError(f"distill.loss must be one of {KD_LOSSES}, got {loss!r}")
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if loss == "forward_kl":  # KL(teacher || student): mode-covering
        d = (t.exp() * (t - s)).sum(-1)
    elif loss == "reverse_kl":  # KL(student || teacher): mode-seeking
        d = (s.exp() * (s - t)).sum(-1)
    else:  # Jensen-Shannon with the mixture m = (p_t + p_s) / 2
        m = torch.logsumexp(torch.stack([s, t]), dim=0) - torch.log(torch.tensor(2.0, device=s.device))
        d = 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)
    return d * temperature**2


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, loss: str = "forward_kl", temperature: float = 1.0
) -> Tensor:
    """Mean over real next-token positions of the divergence between teacher and student."""
    mask = labels[:, 1:] != -100
    s = student_logits[:, :-1][mask]
    t = teacher_logits[:, :-1][mask]
    return kd_token_loss(s, t, loss, temperature).mean()
