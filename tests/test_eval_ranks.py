"""Evaluation under several processes: every rank runs the same number of forward passes (each one
is a collective under FSDP), and the padding a short rank adds is not counted."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from qat.data import TokenBlocks
from qat.evaluate.perplexity import make_windows, perplexity


class Rank:
    """The part of an Accelerator that ``perplexity`` uses, for rank ``r`` of ``world``; ``reduce``
    is left to the test (it adds the ranks' sums itself)."""

    def __init__(self, r: int, world: int):
        self.process_index, self.num_processes, self.device = r, world, torch.device("cpu")

    def reduce(self, t, reduction="sum"):
        return t


class Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, **kw):
        self.calls.append(tuple(kw["input_ids"].shape))
        return self.model(**kw)


@pytest.mark.parametrize("n_blocks,world,batch", [(3, 2, 1), (5, 2, 2), (7, 4, 3), (1, 2, 1)])
def test_ranks_run_equal_forwards_and_the_sums_match_one_process(n_blocks, world, batch):
    model = make_tiny_llama()
    g = torch.Generator().manual_seed(0)
    blocks = TokenBlocks(torch.randint(1, 256, (n_blocks, 16), generator=g), torch.ones(n_blocks, 16, dtype=torch.long))
    one = perplexity(model, blocks, batch)
    nll_sum, tokens, calls = 0.0, 0, []
    for r in range(world):
        m = Counting(model)
        res = perplexity(m, blocks, batch, accelerator=Rank(r, world))
        calls.append(m.calls)
        if res["tokens"]:
            nll_sum += res["nll"] * res["tokens"]
            tokens += res["tokens"]
    assert len({len(c) for c in calls}) == 1, calls  # the same number of forwards on every rank
    assert len({tuple(c) for c in calls}) == 1, calls  # of the same shapes
    assert tokens == one["tokens"]
    assert nll_sum / tokens == pytest.approx(one["nll"], rel=1e-6)


def test_strided_windows_split_across_ranks_score_each_token_once():
    model = make_tiny_llama()
    stream = torch.randint(1, 256, (200,), generator=torch.Generator().manual_seed(1))
    windows = make_windows(stream, 32, stride=16)
    one = perplexity(model, windows, 2)
    parts = [perplexity(model, windows, 2, accelerator=Rank(r, 3)) for r in range(3)]
    assert sum(p["tokens"] for p in parts) == one["tokens"] == windows.n_scored
