"""Distillation: the KD / CE losses (``losses``) and the teacher's top-k cache (``teacher_cache``)."""

from .losses import KD_LOSSES, TOPK_LOSSES, ChunkedDistillLoss, TopK, ce_loss, distill_loss, kd_loss, kd_token_loss, kd_topk_loss

__all__ = ["KD_LOSSES", "TOPK_LOSSES", "ChunkedDistillLoss", "TopK", "ce_loss", "distill_loss", "kd_loss", "kd_token_loss", "kd_topk_loss"]
