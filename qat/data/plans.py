"""Which blocks are used when: the training batch order, the PTQ calibration blocks, the
held-out blocks. Shared by training, PTQ, LoRA initialisation and the analyses, so that "the same
data" means the same blocks everywhere."""

from __future__ import annotations

import math

import torch

from ..recipe import Recipe
from .corpus import TokenBlocks


class BatchPlan:
    """Global micro-batch ``k`` -> this rank's block indices; a pure function of (seed, k)."""

    def __init__(self, n_blocks: int, micro_batch_size: int, world: int, rank: int, seed: int, shuffle: bool = True):
        self.n, self.micro, self.world, self.rank, self.seed, self.shuffle = n_blocks, micro_batch_size, world, rank, seed, shuffle
        self.per_epoch = n_blocks // (micro_batch_size * world)
        self._perm_epoch, self._perm = None, None

    def indices(self, k: int) -> tuple[int, torch.Tensor]:
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
            self._perm_epoch = epoch
        start = pos * self.micro * self.world + self.rank * self.micro
        return epoch, self._perm[start : start + self.micro]


def blocks_used(plan: BatchPlan, micro_batches: int) -> torch.Tensor:
    """Every block index that any process reads in the first ``micro_batches`` global micro-batches."""
    whole = BatchPlan(plan.n, plan.micro * plan.world, 1, 0, plan.seed, plan.shuffle)  # rank slices joined
    return torch.unique(torch.cat([whole.indices(k)[1] for k in range(micro_batches)]))


def batch_of(blocks, idx: torch.Tensor, device) -> dict[str, torch.Tensor]:
    ids = blocks.input_ids[idx].to(device)
    mask = blocks.attention_mask[idx].to(device)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def qat_train_tokens(recipe: Recipe, steps: int, processes: int = 1) -> int:
    """Tokens a QAT run of ``steps`` optimizer steps trains on, over all its processes."""
    t = recipe.train
    return steps * t.micro_batch_size * t.grad_accum * recipe.data.seq_len * processes


def calibration_budget(recipe: Recipe, train_tokens: int, processes: int = 1) -> tuple[int, str]:
    """Calibration tokens and where the number comes from (capped by the training data): the QAT
    run's global budget, so ``processes`` is the number of processes that run trains with (each
    takes its own micro-batches)."""
    p, t = recipe.ptq, recipe.train
    if p.calib_tokens is not None:
        want, why = p.calib_tokens, "ptq.calib_tokens"
    elif t.max_steps is not None:
        want = qat_train_tokens(recipe, t.max_steps, processes)
        why = f"QAT budget: train.max_steps {t.max_steps} x micro_batch_size {t.micro_batch_size} x grad_accum {t.grad_accum} x seq_len {recipe.data.seq_len}"
        why += f" x {processes} processes" if processes != 1 else ""
    else:
        want = math.ceil(t.epochs * train_tokens)
        why = f"QAT budget: train.epochs {t.epochs} x {train_tokens} training tokens"
    if want > train_tokens:
        return train_tokens, f"{why} = {want}, capped by the {train_tokens} training tokens"
    return want, why


def calibration_blocks(train_set, tokens: int, seed: int):
    """The first ``ceil(tokens / seq_len)`` blocks of the QAT run's epoch-0 order."""
    k = min(len(train_set), max(1, -(-tokens // train_set.input_ids.shape[1])))
    idx = BatchPlan(len(train_set), k, 1, 0, seed).indices(0)[1]
    return TokenBlocks(train_set.input_ids[idx], train_set.attention_mask[idx])


def heldout_blocks(valid_set, n_tokens: int):
    """The first ``n_tokens`` tokens' worth of rows of the validation blocks (never calibrated on)."""
    rows = max(1, min(len(valid_set), -(-n_tokens // valid_set.input_ids.shape[1])))
    return TokenBlocks(valid_set.input_ids[:rows], valid_set.attention_mask[:rows])
