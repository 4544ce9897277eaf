"""Evaluation: perplexity over token blocks (and KL to a teacher), deterministic, DDP-aware.

Each block predicts its tokens 1..T-1 from the ones before; perplexity is
``exp(sum NLL / number of predicted real tokens)``. Under several processes each rank takes a
contiguous slice of the blocks and the sums are added across ranks. Every rank runs the same
number of forward passes of the same batch size (under FSDP each forward is a collective): a
rank whose slice is short pads it with copies of a block whose tokens are not counted.

``Windows`` (from ``token_stream`` + ``make_windows``) carry a ``score_mask``: with a stride
``s < T`` the windows overlap and each scores only the tokens no earlier window scored (its last
``s``), every one of them predicted from at least ``T - s`` tokens of context. Without a stride
the windows are the non-overlapping blocks of the packed stream (the remainder is dropped), i.e.
the same rows ``data.build_datasets`` makes for the validation split.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..distill import kd_token_loss


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
    """``{"ppl", "nll", "tokens"}`` (+ with a teacher: ``"kl_to_teacher"``, the mean forward KL
    per token, and the teacher's own ``"teacher_ppl"`` / ``"teacher_nll"`` on the same tokens)."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    n = len(blocks)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    per_rank = math.ceil(n / world)
    lo = rank * per_rank
    real = list(range(lo, min(n, lo + per_rank)))
    rows = torch.tensor(real + [0] * (per_rank - len(real)), dtype=torch.long)  # padded: same forwards on every rank
    counted = torch.tensor([True] * len(real) + [False] * (per_rank - len(real)))
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nll, tokens, kl, teacher nll
    score_mask = getattr(blocks, "score_mask", None)
    starts = range(0, per_rank, batch_size)
    if desc and rank == 0:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, leave=False)
    for start in starts:
        idx = rows[start : start + batch_size]
        ids = blocks.input_ids[idx].to(device)
        mask = blocks.attention_mask[idx].to(device)
        labels = ids.masked_fill(mask == 0, -100)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        sel = (labels[:, 1:] != -100) & counted[start : start + batch_size].to(device).unsqueeze(1)
        if score_mask is not None:  # strided windows: only the tokens this window is responsible for
            sel &= score_mask[idx, 1:].to(device).bool()
        s = logits[:, :-1][sel].float()
        sums[0] += F.cross_entropy(s, labels[:, 1:][sel], reduction="sum").double()
        sums[1] += sel.sum()
        if teacher is not None:
            t = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][sel].float()
            sums[2] += kd_token_loss(s, t, "forward_kl").sum().double()
            sums[3] += F.cross_entropy(t, labels[:, 1:][sel], reduction="sum").double()
    if accelerator is not None and world > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    model.train(was_training)
    tokens = int(sums[1].item())
    nll = (sums[0] / sums[1]).item() if tokens else float("nan")
    out = {"ppl": math.exp(nll) if tokens else float("nan"), "nll": nll, "tokens": tokens}
    if teacher is not None:
        out["kl_to_teacher"] = (sums[2] / sums[1]).item() if tokens else float("nan")
        t_nll = (sums[3] / sums[1]).item() if tokens else float("nan")
        out["teacher_nll"], out["teacher_ppl"] = t_nll, math.exp(t_nll) if tokens else float("nan")
    return out


# -- windows over a token stream -----------------------------------------------------------
class Windows:
    """Rows of ``seq_len`` tokens with an attention mask and a ``score_mask`` (1 = this row
    predicts that token); duck-types ``TokenBlocks`` for ``perplexity``."""

    def __init__(self, input_ids: torch.Tensor, score_mask: torch.Tensor, stride: int | None):
        self.input_ids = input_ids
        self.attention_mask = torch.ones_like(input_ids)
        self.score_mask = score_mask
        self.stride = stride

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_scored(self) -> int:
        return int(self.score_mask[:, 1:].sum())


def token_stream(texts, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """Documents -> one stream of token ids with ``eos`` before every document (as ``data.py``
    packs them; no special tokens added). With ``max_tokens``, documents are tokenized only
    until the stream is that long (the stream may be longer; cut it)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token to join documents with")
    texts = list(texts)
    ids: list[int] = []
    start, step = 0, 16
    while start < len(texts) and (max_tokens is None or len(ids) < max_tokens):
        chunk = texts[start : start + step] if max_tokens is not None else texts
        enc = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        for doc in enc:
            ids.append(eos)
            ids.extend(doc)
        start += len(chunk)
        step *= 2
    return torch.tensor(ids, dtype=torch.long)


def make_windows(stream: torch.Tensor, seq_len: int, stride: int | None = None, max_tokens: int | None = None) -> Windows:
    """Windows of ``seq_len`` tokens starting every ``stride`` (default ``seq_len``: no overlap)
    tokens; windows that would run past the end are dropped. Each token is scored at most once."""
    if max_tokens is not None:
        stream = stream[:max_tokens]
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    n = len(stream)
    if n < seq_len:
        raise ValueError(f"{n} tokens are fewer than one window of {seq_len}")
    starts = torch.arange(0, n - seq_len + 1, stride)
    ids = torch.stack([stream[b : b + seq_len] for b in starts.tolist()])
    score = torch.zeros_like(ids)
    score[0, 1:] = 1
    if len(starts) > 1:
        # window k (k >= 1) predicts the positions past the previous window's end
        first_new = seq_len - (starts[1:] - starts[:-1])  # = seq_len - stride
        pos = torch.arange(seq_len)
        score[1:] = (pos.unsqueeze(0) >= first_new.unsqueeze(1)).long()
        score[1:, 0] = 0
    return Windows(ids, score, stride)
