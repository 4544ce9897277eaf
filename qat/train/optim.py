"""The optimizer (AdamW, or bitsandbytes' 8-bit AdamW) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..deps import require
from ..recipe import Recipe


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    t = recipe.train
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            is_qparam = name.endswith(("weight_scale", "weight_zero_point"))
            (decay if p.ndim >= 2 and not is_qparam else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=t.lr, betas=t.betas, eps=t.eps)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kw)
    bnb = require("bitsandbytes", f"train.optimizer: {t.optimizer}")
    cls = bnb.optim.AdamW8bit if t.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, **kw)


def lr_at(step: int, recipe: Recipe, max_steps: int) -> float:
    t = recipe.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, max_steps - t.warmup_steps))
    factor = 1 - progress if t.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * factor)
