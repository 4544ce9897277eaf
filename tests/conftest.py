"""Shared fixtures: a tiny random Llama built from a config, and the pretrained llama-tiny fixture.

Read-only fixtures live beside the repository, in ``../shared`` (CI provides them); tests that
need them skip with a clear reason when they are absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
LLAMA_TINY = SHARED / "models" / "llama-tiny"
HAVE_TINY = (LLAMA_TINY / "config.json").is_file()
NO_FIXTURES = "../shared/models/llama-tiny not found (fixtures live beside the repo; CI has them)"
# A mark, not a fixture: marks are evaluated before any fixture is set up, so a module-scoped
# fixture that trains on llama-tiny never runs where the fixtures are absent.
needs_tiny = pytest.mark.skipif(not HAVE_TINY, reason=NO_FIXTURES)


# A run that needs no fixture: the quickstart's from-scratch recipe, shrunk to a 1-layer model on a
# little stdlib text (seconds on a CPU). Tests of the run machinery use it so a fresh clone runs them.
PRETRAIN = str(REPO_ROOT / "recipes" / "quickstart" / "pretrain.yaml")
SCRATCH_SMALL = ["data.max_train_tokens=20000", "data.max_valid_tokens=2048", "train.micro_batch_size=4",
                 "tokenizer.train_vocab_size=300", "model.config.hidden_size=32", "model.config.intermediate_size=64",
                 "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2", "model.config.num_hidden_layers=1"]


def require_tiny() -> Path:
    """Skip the calling test or fixture (with the reason shown in the summary) without llama-tiny."""
    if not HAVE_TINY:
        pytest.skip(NO_FIXTURES)
    return LLAMA_TINY


def make_tiny_llama(seed: int = 0):
    """A 2-block Llama (hidden 64, 4 heads, MLP 128, vocab 256), seeded, fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    return model.eval()


def make_tiny_opt(seed: int = 0):
    """A 2-block OPT (``model.decoder.layers.N.{self_attn.{q,k,v,out}_proj, fc1, fc2}``)."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=128,
        vocab_size=256,
        max_position_embeddings=128,
        word_embed_proj_dim=64,
    )
    torch.manual_seed(seed)
    return OPTForCausalLM(config).to(torch.float32).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_opt():
    return make_tiny_opt()


@pytest.fixture
def llama_tiny_path() -> Path:
    return require_tiny()


def assert_finals_match(one: Path, two: Path, lr: float, steps: int, bits: int = 4, group: int = 64) -> int:
    """Two runs' final/ from the same global batches summed in another order (processes, sharding):
    ov-frozen layers and their scales bit-identical; every other tensor within 2 * lr * steps
    absolute (AdamW moves a weight by at most ~lr a step); >= 99 % of every quantized layer's codes
    identical; min-max scales (absmax / ((qmax - qmin) / 2)) within the same bound divided by
    (qmax - qmin) / 2, since each run's group absmax moves by at most lr * steps. Returns the
    number of frozen layers."""
    import json

    from safetensors.torch import load_file

    from qat.quant.grid import quantize

    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (one, two))
    qa, qb = (load_file(str(d / "final" / "qat" / "qparams.safetensors")) for d in (one, two))
    layers = json.loads((one / "final" / "qat_quant.json").read_text())["layers"]
    for key in a:
        name = key.removesuffix(".weight")
        if name not in layers:
            assert (a[key] - b[key]).abs().max() <= 2 * lr * steps, key
            continue
        sa, sb = qa[f"{name}.weight_scale"], qb[f"{name}.weight_scale"]
        za, zb = qa[f"{name}.weight_zero_point"], qb[f"{name}.weight_zero_point"]
        if layers[name]["frozen"]:
            assert torch.equal(a[key], b[key]) and torch.equal(sa, sb), key
        ca, cb = quantize(a[key], sa, za, bits, True, group), quantize(b[key], sb, zb, bits, True, group)
        assert (ca == cb).float().mean() >= 0.99, key
        assert (sa - sb).abs().max() <= 2 * lr * steps / ((2**bits - 1) / 2), key
    return sum(info["frozen"] for info in layers.values())
