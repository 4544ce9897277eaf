"""The start-of-run MSE clip search split over processes (``qat.policy.search.clip_ratios``):
2 gloo processes find, for every layer, exactly the ratio that layer's own search finds, whether
both hold the weights (DDP) or only the main one does (FSDP2's load-once, the other holding the
structure on the meta device); and ``quantize_model`` given those ratios builds the model a
searching ``quantize_model`` builds."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

from qat.quant import QuantScheme, quantize_model
from qat.quant.apply import planned_weight
from qat.policy.search import clip_ratios

WORLD = 2
MSE4 = QuantScheme(bits=4, group_size=32, symmetric=True, scale_init="mse")
OVERRIDES = [(r"down_proj", QuantScheme(bits=3, group_size=None, symmetric=False, scale_init="mse")),
             (r"k_proj", QuantScheme(bits=4, group_size=32, symmetric=True, scale_init="minmax"))]


def build(kind: str, meta: bool = False):
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          vocab_size=128, tie_word_embeddings=False)
    else:
        cfg = Qwen3MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    return AutoModelForCausalLM.from_config(cfg)


def plan(kind: str) -> dict:
    report = quantize_model(build(kind, meta=True), MSE4, layer_schemes=OVERRIDES if kind == "llama" else None)
    return dict(report.layers)


class _Acc:  # what clip_ratios reads of an Accelerator
    def __init__(self, rank: int):
        self.num_processes, self.process_index, self.device = WORLD, rank, torch.device("cpu")


CASES = [("llama", True), ("llama", False), ("moe", True)]  # (model, only the main process holds the weights)


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    for kind, main_only in CASES:
        model = build(kind, meta=main_only and rank != 0)
        torch.save(clip_ratios(model, plan(kind), _Acc(rank)), f"{out}.{kind}.{main_only}.{rank}")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("search") / "ratios")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return {(kind, main_only): [torch.load(f"{out}.{kind}.{main_only}.{r}") for r in range(WORLD)] for kind, main_only in CASES}


@pytest.mark.parametrize("kind,main_only", CASES)
def test_split_search_finds_each_layers_own_ratio(searched, kind, main_only):
    from qat.quant.grid import mse_clip_ratio

    got = searched[(kind, main_only)]
    model, layers = build(kind), plan(kind)
    wanted = {n for n, s in layers.items() if s.scale_init == "mse"}
    assert set(got[0]) == set(got[1]) == wanted and len(wanted) >= 6
    if kind == "moe":
        assert any(planned_weight(model, n).ndim == 3 for n in wanted)  # fused expert tensors among them
    for n in wanted:
        s = layers[n]
        want = mse_clip_ratio(planned_weight(model, n).detach().float(), s.bits, s.group_size, s.symmetric, seq=s.seq)
        assert torch.equal(got[0][n], want) and torch.equal(got[1][n], want), n
        assert (want < 1).any(), n  # the search moved off min-max somewhere

    # quantize_model given the ratios = quantize_model searching itself, buffer for buffer
    a, b = build(kind), build(kind)
    over = OVERRIDES if kind == "llama" else None
    quantize_model(a, MSE4, layer_schemes=over)
    quantize_model(b, MSE4, layer_schemes=over, ratios=got[1])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_no_ratios_means_no_search():
    """``ratios={}`` (a resume: the checkpoint holds the qparams): every layer starts at ratio 1."""
    model = build("llama")
    quantize_model(model, MSE4, ratios={})
    ratios = [m.clip_ratio for m in model.modules() if hasattr(m, "clip_ratio")]
    assert ratios and all(torch.equal(r, torch.ones_like(r)) for r in ratios)
