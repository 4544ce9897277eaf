"""Losses of the student: knowledge distillation from the teacher's logits, and cross-entropy.

All losses are over the *shifted* next-token positions (position t predicts token t+1), with
padding (label -100) masked out, and averaged over the real tokens, not over the batch.
Computation is in float32 whatever the logits' dtype.

The teacher comes either as full logits ``[B, T, V]`` or as its top-k (``TopK``: ids and logits
``[B, T, k]``, e.g. read from the teacher cache, ``qat/distill/teacher_cache.py``). The top-k KD loss of a
token is defined as follows: the teacher distribution is the softmax of its top-k logits / T,
i.e. the teacher renormalised over its k ids and zero elsewhere; the student's log-probabilities
are the log-softmax of its logits / T over the *full* vocabulary, gathered at those ids. Then

- ``forward_kl``: sum over the k ids of q (log q - log p_s), KL(teacher || student); the student's
  mass outside the k ids is pushed down through its full-vocabulary normalisation;
- ``jsd``: the Jensen-Shannon divergence of the two full-vocabulary distributions (the teacher's
  zero outside the k ids): over the k ids as in ``kd_token_loss``, plus the student's mass outside
  them times 0.5 log 2 (there the mixture is half the student's probability);
- ``reverse_kl`` (and ``cakld``, which mixes it in) is infinite for a teacher with zeros (the student has mass everywhere) and is
  refused.

With k = V both equal the full-logit losses. All are scaled by T^2.

``cakld`` (full logits only) is BitDistiller's confidence-aware KL (Du et al., 2024) per token:
``c * KL(student || teacher) + (1 - c) * KL(teacher || student)`` with ``c`` the teacher's largest
probability at that token (BitDistiller uses one ``c``, the teacher's mean confidence over the
data): mode-seeking where the teacher is sure, mode-covering where it is not.

``distill_loss`` is what training calls: KD and CE together, naive (``chunk_tokens=None``: every
``[n, V]`` float32 tensor at once, as ``kd_loss`` / ``ce_loss`` do) or chunked over tokens
(``ChunkedDistillLoss``): float32 copies of at most ``chunk_tokens`` rows exist at a time, and the
gradient w.r.t. the student logits is computed during the forward, chunk by chunk, by autograd
over the same per-token functions, and kept in the logits' own dtype until backward. The chunked
loss is therefore the naive loss summed in another order (equal to float32 rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "cakld")
TOPK_LOSSES = ("forward_kl", "jsd")


@dataclass
class TopK:
    """The teacher's top-k logits per position: ``ids`` (int) and ``logits``, both ``[B, T, k]``."""

    ids: Tensor
    logits: Tensor


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
    elif loss == "cakld":  # confidence-aware: c * RKL + (1 - c) * FKL, c = the teacher's top probability
        pt = t.exp()
        c = pt.amax(-1)
        d = c * (s.exp() * (s - t)).sum(-1) + (1 - c) * (pt * (t - s)).sum(-1)
    else:  # Jensen-Shannon with the mixture m = (p_t + p_s) / 2
        m = torch.logsumexp(torch.stack([s, t]), dim=0) - torch.log(torch.tensor(2.0, device=s.device))
        d = 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)
    return d * temperature**2


def kd_topk_token_loss(student: Tensor, top_ids: Tensor, top_logits: Tensor, loss: str = "forward_kl", temperature: float = 1.0) -> Tensor:
    """Per-token top-k divergence ``[n]``: student ``[n, V]`` logits, the teacher's ``[n, k]`` ids
    and logits (definition in the module docstring), scaled by T^2."""
    if loss not in TOPK_LOSSES:
        raise ValueError(f"the top-k KD loss is one of {TOPK_LOSSES} (reverse KL to a teacher with zeros is infinite), got {loss!r}")
    s = F.log_softmax(student.float() / temperature, dim=-1).gather(-1, top_ids.long())
    t = F.log_softmax(top_logits.float() / temperature, dim=-1)  # the teacher renormalised over its k ids
    if loss == "forward_kl":
        d = (t.exp() * (t - s)).sum(-1)
    else:
        log2 = math.log(2.0)
        m = torch.logaddexp(s, t) - log2
        outside = (1 - s.exp().sum(-1)).clamp_min(0)  # student mass outside the k ids; m = p_s / 2 there
        d = 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * ((s.exp() * (s - m)).sum(-1) + outside * log2)
    return d * temperature**2


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, loss: str = "forward_kl", temperature: float = 1.0
) -> Tensor:
    """Mean over real next-token positions of the divergence between teacher and student."""
    mask = labels[:, 1:] != -100
    s = student_logits[:, :-1][mask]
    t = teacher_logits[:, :-1][mask]
    return kd_token_loss(s, t, loss, temperature).mean()


def kd_topk_loss(student_logits: Tensor, teacher: TopK, labels: Tensor, loss: str = "forward_kl", temperature: float = 1.0) -> Tensor:
    """``kd_loss`` with the teacher given by its top-k (naive: all positions at once)."""
    mask = labels[:, 1:] != -100
    s = student_logits[:, :-1][mask]
    return kd_topk_token_loss(s, teacher.ids[:, :-1][mask], teacher.logits[:, :-1][mask], loss, temperature).mean()


def _token_losses(z: Tensor, teacher: Tensor | TopK | None, targets: Tensor, loss: str, temperature: float) -> tuple[Tensor, Tensor]:
    """Per-token (KD, CE) of float32 student rows ``z [c, V]``; KD is zeros without a teacher."""
    ce = F.cross_entropy(z, targets, reduction="none")
    if teacher is None:
        return torch.zeros_like(ce), ce
    if isinstance(teacher, TopK):
        return kd_topk_token_loss(z, teacher.ids, teacher.logits, loss, temperature), ce
    return kd_token_loss(z, teacher, loss, temperature), ce


class ChunkedDistillLoss(torch.autograd.Function):
    """``(kd_weight * KD + ce_weight * CE, KD, CE)``, means over the real next-token positions,
    walking those positions ``chunk`` rows at a time (KD and CE are returned for logging and
    carry no gradient). Under ``retain_graph`` a second backward is refused: the gradient buffer is
    scaled in place."""

    @staticmethod
    def forward(ctx, student, t_full, t_ids, t_logits, labels, loss, temperature, kd_weight, ce_weight, chunk):
        B, T, V = student.shape
        mask = labels[:, 1:] != -100
        rows = torch.arange(B * T, device=student.device).view(B, T)[:, :-1][mask]  # rows of the [B*T, V] view
        targets = labels[:, 1:][mask]
        flat = student.reshape(B * T, V)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(student) if need_grad else None
        sums = torch.zeros(2, dtype=torch.float32, device=student.device)
        with torch.autocast(student.device.type, enabled=False):
            for r, tgt in zip(rows.split(chunk), targets.split(chunk)):
                if t_full is not None:
                    teacher = t_full.reshape(B * T, -1).index_select(0, r)
                elif t_ids is not None:
                    teacher = TopK(t_ids.reshape(B * T, -1).index_select(0, r), t_logits.reshape(B * T, -1).index_select(0, r))
                else:
                    teacher = None
                z = flat.index_select(0, r).float()
                with torch.enable_grad():
                    z.requires_grad_(need_grad)
                    kd, ce = _token_losses(z, teacher, tgt, loss, temperature)
                    terms = [w * x.sum() for w, x in ((kd_weight, kd), (ce_weight, ce)) if w != 0]
                    if need_grad and terms:  # per-token gradient (not yet divided by n), in the logits' dtype
                        (g,) = torch.autograd.grad(sum(terms), z)
                        grad.view(B * T, V).index_copy_(0, r, g.to(student.dtype))
                sums += torch.stack([kd.detach().sum(), ce.detach().sum()])
        n = rows.numel()
        kd, ce = sums[0] / n, sums[1] / n
        ctx.n, ctx.used = n, False
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(kd, ce)
        return kd_weight * kd + ce_weight * ce, kd, ce

    @staticmethod
    def backward(ctx, g_total, _g_kd, _g_ce):
        if ctx.used:
            raise RuntimeError("ChunkedDistillLoss: a second backward through the same loss is not supported")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(g_total / ctx.n), None, None, None, None, None, None, None, None, None


def distill_loss(
    student_logits: Tensor,
    teacher: Tensor | TopK | None,
    labels: Tensor,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(kd_weight * KD + ce_weight * CE, KD, CE)`` over the shifted real tokens; KD is None
    without a teacher (then the loss is ``ce_weight * CE``). ``chunk_tokens=None``: the naive
    losses; an int: ``ChunkedDistillLoss`` with chunks of that many tokens (same values)."""
    if isinstance(teacher, TopK) and loss not in TOPK_LOSSES:
        raise ValueError(f"the top-k KD loss is one of {TOPK_LOSSES} (reverse KL to a teacher with zeros is infinite), got {loss!r}")
    if teacher is not None and not isinstance(teacher, TopK) and loss not in KD_LOSSES:
        raise ValueError(f"distill.loss must be one of {KD_LOSSES}, got {loss!r}")
    if chunk_tokens is None:
        ce = ce_loss(student_logits, labels)
        if teacher is None:
            return ce_weight * ce, None, ce
        if isinstance(teacher, TopK):
            kd = kd_topk_loss(student_logits, teacher, labels, loss, temperature)
        else:
            kd = kd_loss(student_logits, teacher, labels, loss, temperature)
        return kd_weight * kd + ce_weight * ce, kd, ce
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens}")
    t_full = teacher if isinstance(teacher, Tensor) else None
    t_ids, t_logits = (teacher.ids, teacher.logits) if isinstance(teacher, TopK) else (None, None)
    kw = 0.0 if teacher is None else kd_weight
    total, kd, ce = ChunkedDistillLoss.apply(student_logits, t_full, t_ids, t_logits, labels, loss, temperature, kw, ce_weight, chunk_tokens)
    return total, (None if teacher is None else kd), ce
