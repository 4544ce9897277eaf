"""The bitsandbytes NF4 baseline (qat/ptq/nf4.py) in ``qat ptq`` and ``qat compare``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, require_tiny

pytest.importorskip("bitsandbytes")
REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes/tiny/w4-ovfreeze.yaml")


def test_nf4_roundtrip_is_bnb_blocksize_64():
    import bitsandbytes.functional as F

    from qat.ptq.nf4 import nf4_roundtrip

    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    out = nf4_roundtrip(w)
    q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert st.blocksize == 64 and torch.equal(out, F.dequantize_4bit(q, st, quant_type="nf4"))
    # 16 levels per block of 64, scaled by the block's absmax
    blocks = out.reshape(-1, 64)
    assert all(len(torch.unique(b)) <= 16 for b in blocks)
    assert torch.allclose(blocks.abs().amax(1), w.reshape(-1, 64).abs().amax(1))
    assert 0 < (out - w).abs().mean() < 0.1 * w.abs().mean()


def test_nf4_in_quantize_ptq_touches_only_planned_layers():
    from qat.ptq import quantize_ptq

    model = make_tiny_llama()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    plan = {"model.layers.0.mlp.up_proj": None, "model.layers.1.self_attn.q_proj": None}
    _, info, _ = quantize_ptq(model, plan, "nf4", None, None, "cpu", "cpu")
    assert info["nf4_layers"] == sorted(plan) and info["blocksize"] == 64
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]) != (k[: -len(".weight")] in plan), k


def test_qat_ptq_nf4_and_compare(monkeypatch, tmp_path):
    require_tiny()
    monkeypatch.chdir(REPO)
    from qat.cli import main

    out = tmp_path / "nf4"
    fast = ["data.max_train_tokens=2048", "data.max_valid_tokens=1024", "eval.batch_size=8", "ptq.diag_tokens=512"]
    assert main(["ptq", TINY, f"output_dir={out}", "--method", "nf4", *fast]) == 0
    q = json.loads((out / "final" / "qat_quant.json").read_text())
    assert q["layers"] == {} and q["nf4"]["blocksize"] == 64 and not q["nf4"]["on_qat_grid"]
    assert "NOT on qat's integer grid" in q["nf4"]["note"] and len(q["nf4"]["layers"]) == 28
    ev = json.loads((out / "eval.json").read_text())
    assert ev["method"] == "nf4" and ev["bits_per_weight"] == 4.5 and ev["calib_tokens"] == 0
    assert ev["student"]["ppl"] < 1.2 * ev["teacher"]["ppl"]  # 4-bit NF4 on llama-tiny: close to FP
    from qat.compare import run_or_reuse_ptq
    from qat.recipe import load_recipe

    recipe = load_recipe(TINY, [f"output_dir={tmp_path / 'cmp'}", *fast, "ptq.methods=[nf4]"])
    d, ev2, reused = run_or_reuse_ptq(recipe, "nf4", rerun=False)
    assert d == Path(f"{tmp_path / 'cmp'}-ptq-nf4") and ev2["method"] == "nf4" and not reused
    assert run_or_reuse_ptq(recipe, "nf4", rerun=False)[2]  # reused the second time
