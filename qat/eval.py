"""Evaluation: perplexity over token blocks (and KL to a teacher), deterministic, DDP-aware.

Each block predicts its tokens 1..T-1 from the ones before; perplexity is
``exp(sum NLL / number of predicted real tokens)``. Under several processes each rank takes a
contiguous slice of the blocks and the sums are added across ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .distill import kd_token_loss


@torch.no_grad()
def perplexity(
    model: nn.Module,
    blocks,
    batch_size: int = 8,
    max_batches: int | None = None,
    teacher: nn.Module | None = None,
    accelerator=None,
    desc: str | None = None,
) -> dict:
    """``{"ppl", "nll", "tokens"}`` (+ ``"kl_to_teacher"``: mean forward KL per token)."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    n = len(blocks)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    per_rank = math.ceil(n / world)
    lo, hi = rank * per_rank, min(n, (rank + 1) * per_rank)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, kl
    starts = range(lo, hi, batch_size)
    if desc and rank == 0:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, leave=False)
    for start in starts:
        end = min(start + batch_size, hi)
        ids = blocks.input_ids[start:end].to(device)
        mask = blocks.attention_mask[start:end].to(device)
        labels = ids.masked_fill(mask == 0, -100)
        logits = model(input_ids=ids, attention_mask=mask).logits
        sel = labels[:, 1:] != -100
        s = logits[:, :-1][sel].float()
        sums[0] += F.cross_entropy(s, labels[:, 1:][sel], reduction="sum").double()
        sums[1] += sel.sum()
        if teacher is not None:
            t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1][sel]
            sums[2] += kd_token_loss(s, t, "forward_kl").sum().double()
    if accelerator is not None and world > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    model.train(was_training)
    tokens = int(sums[1].item())
    nll = (sums[0] / sums[1]).item() if tokens else float("nan")
    out = {"ppl": math.exp(nll) if tokens else float("nan"), "nll": nll, "tokens": tokens}
    if teacher is not None:
        out["kl_to_teacher"] = (sums[2] / sums[1]).item() if tokens else float("nan")
    return out
