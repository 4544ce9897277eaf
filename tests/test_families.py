"""Every common decoder family through train, PTQ, export and reload.

Each family is a random-weight model built from its transformers config (2 blocks, hidden 64,
4 experts of which 2 per token for MoE models), saved with a 300-id tokenizer, then run through
what a user runs: `qat train` with the W4 and the W2 defaults (2 steps each), `qat export
--format compressed-tensors --verify` of both (the W2 run's SEQ grid exports as int4), a reload of
`final/` with transformers' load report checked, and `qat ptq --method gptq`. No fixtures and no
downloads: this runs in both CI runs. A new family is one line of FAMILIES.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from test_recipes import REPO, SEP, smoke_overrides

from qat.cli import main

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
FAMILIES = {  # model_type -> config keys on top of BASE
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma2": {},
    "gemma3_text": {},
    "olmo2": {},
    "granite": {},
    "smollm3": {},
    "phi3": {},
    "gpt_neox": {},
    "falcon": {"head_dim": None, "new_decoder_architecture": True, "num_kv_heads": 2},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "mixtral": MOE,
    "qwen2_moe": {**MOE, "shared_expert_intermediate_size": 64},
    "qwen3_moe": MOE,
    "deepseek_v3": {**MOE, "head_dim": None, "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
                    "v_head_dim": 16, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "n_shared_experts": 1},
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
RECIPE = "recipes/tiny/w4-ovfreeze.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    from qat.data.corpus import train_tokenizer

    root = tmp_path_factory.mktemp("families")
    text = SEP.join((REPO / f).read_text() for f in ("README.md", "qat/recipe.py", "qat/train/loop.py", "qat/io/rundir.py"))
    (root / "text.txt").write_text(text)
    return {"root": root, "text": root / "text.txt", "tokenizer": train_tokenizer([text], 300)}


def build(family: str, corpus: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    keys = {k: v for k, v in {**BASE, **FAMILIES[family]}.items() if v is not None}
    torch.manual_seed(0)
    d = corpus["root"] / family
    AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **keys)).save_pretrained(d)
    corpus["tokenizer"].save_pretrained(d)
    return d


def overrides(corpus: dict, model_dir, out, bits: int) -> list[str]:
    o = [x for x in smoke_overrides(RECIPE, {"text": corpus["text"], "models": {"llama": model_dir}}, out) if not x.startswith("model.path=")]
    return [*o, f"model.path={model_dir}", f"quant={{bits: {bits}, group_size: 16}}", "freeze.policy=null"]


def reload_report(final) -> dict:
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    return {k: sorted(map(str, v)) for k, v in info.items() if v}


def check_servable_layout(export) -> None:
    """What vLLM's compressed-tensors loader needs beside the tensors: one symmetric int4
    pack-quantized scheme targeting Linear, and every matrix of the blocks written dense (a router,
    an unquantized Linear) listed in ``ignore`` (vLLM would expect packed weights for it)."""
    from safetensors import safe_open

    qc = json.loads((export / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["weights"]["symmetric"] and group["weights"]["num_bits"] == 4
    dense = set()
    for f in export.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            dense |= {k.removesuffix(".weight") for k in st.keys() if k.endswith(".weight") and len(st.get_slice(k).get_shape()) == 2}
    blocks = {n for n in dense if ".layers." in n}
    assert blocks <= set(qc["ignore"]), sorted(blocks - set(qc["ignore"]))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_quantizes_exports_and_reloads(family, corpus, tmp_path, capsys):
    model_dir = build(family, corpus)
    for bits in (4, 2):
        run = tmp_path / f"w{bits}"
        assert main(["train", str(REPO / RECIPE), *overrides(corpus, model_dir, run, bits)]) == 0, f"train W{bits}"
        out = capsys.readouterr().out
        share = float(out.split("quantized ")[1].split("%")[0])
        assert share > 95.0, out  # the experts are quantized, not silently left out
        assert "WARNING" not in out
        layers = json.loads((run / "final" / "qat_quant.json").read_text())["layers"]
        if family in MOE_FAMILIES:
            assert any(i.get("experts") == 4 for i in layers.values()), layers.keys()
        assert reload_report(run / "final") == {}, f"final/ of W{bits} reloads with a clean load report"
        assert main(["export", str(run), "--format", "compressed-tensors", "--verify"]) == 0, f"export W{bits}"
        assert "max abs difference 0 (identical)" in capsys.readouterr().out
        check_servable_layout(run / "export-compressed-tensors")
    ptq = tmp_path / "gptq"
    o = [x if not x.startswith("output_dir=") else f"output_dir={ptq}" for x in overrides(corpus, model_dir, ptq, 4)]
    assert main(["ptq", str(REPO / RECIPE), "--method", "gptq", *o]) == 0
    out = capsys.readouterr().out
    if family in MOE_FAMILIES:
        assert "experts calibrated on the tokens routed to them" in out
    assert (ptq / "final" / "qat_quant.json").is_file()


def test_ov_freeze_on_a_fused_qkv_projection_says_why_it_cannot(corpus, tmp_path, capsys):
    model_dir = build("phi3", corpus)
    o = overrides(corpus, model_dir, tmp_path / "run", 4)
    assert main(["train", str(REPO / RECIPE), *o, "freeze.policy=ov-freeze"]) == 2
    err = capsys.readouterr().err
    assert "fused with q and k into one Linear, model.layers.0.self_attn.qkv_proj" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_experts_under_the_token_minimum_fall_back_to_rtn_and_say_so(corpus, tmp_path, capsys):
    model_dir = build("qwen3_moe", corpus)
    out = tmp_path / "gptq"
    o = overrides(corpus, model_dir, out, 4)
    assert main(["ptq", str(REPO / RECIPE), "--method", "gptq", *o, "ptq.expert_min_tokens=100000"]) == 0
    assert "8 experts calibrated on the tokens routed to them" in capsys.readouterr().out
    details = json.loads((out / "eval.json").read_text())["details"]
    tokens = details["expert_tokens"]
    assert sorted(tokens) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")]
    assert all(len(c) == 4 and sum(c) > 0 for c in tokens.values())
    gptq_layers = [n for n in details if n.startswith("model.layers")]
    assert gptq_layers and not any("experts" in n for n in gptq_layers)  # every expert went to RTN


def test_an_moe_trains_sharded_with_fsdp2_and_exports_exactly(corpus, tmp_path, capsys):
    """The FSDP2 launch configuration wraps whichever decoder layer the model names (no Llama
    class in it): a Qwen3-MoE trains on 2 CPU processes, its sharded expert tensors are gathered
    into final/, which exports exactly."""
    import os
    import subprocess
    import sys

    model_dir = build("qwen3_moe", corpus)
    out = tmp_path / "fsdp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    o = [x for x in overrides(corpus, model_dir, out, 4) if not x.startswith("train.micro_batch_size")]
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/cpu-2proc-fsdp2.yaml"),
         "-m", "qat", "train", str(REPO / RECIPE), *o, "train.micro_batch_size=1"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "4 expert tensors x 4 experts" in proc.stdout
    assert reload_report(out / "final") == {}
    assert main(["export", str(out), "--format", "compressed-tensors", "--verify"]) == 0
    assert "max abs difference 0 (identical)" in capsys.readouterr().out


def test_an_moe_run_starts_from_its_gptq_result(corpus, tmp_path, capsys):
    """quant.init_from on a MoE: the QAT student starts on the GPTQ run's codes and qparams of
    every expert (before any step its final/ is the GPTQ final/, up to the last bit of a scale
    that dynamic qparams recompute as min-max x ratio, as for Linear layers)."""
    from safetensors.torch import load_file

    model_dir = build("qwen3_moe", corpus)
    ptq = tmp_path / "gptq"
    assert main(["ptq", str(REPO / RECIPE), "--method", "gptq", *overrides(corpus, model_dir, ptq, 4)]) == 0
    run = tmp_path / "qat"
    o = [x for x in overrides(corpus, model_dir, run, 4) if not x.startswith("train.max_steps")]
    assert main(["train", str(REPO / RECIPE), *o, f"quant.init_from={ptq}", "train.max_steps=0"]) == 0
    assert "quant.init_from: 12 layers" in capsys.readouterr().out
    a, b = load_file(str(ptq / "final" / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    experts = [k for k in a if ".experts." in k]
    assert len(experts) == 24 and all(torch.allclose(a[k], b[k], rtol=1e-6, atol=0) for k in experts)
    assert not all(torch.allclose(a[k], load_file(str(model_dir / "model.safetensors"))[k], rtol=1e-3) for k in experts)


def test_verify_fails_on_expert_tensors_the_loader_does_not_load(corpus, tmp_path, capsys):
    """An export whose load report has a missing tensor is never called exact: here the packed
    tensors of one block's down_proj experts are dropped, transformers initialises that fused
    tensor at random, and verify reports it (the CLI then exits 1)."""
    from safetensors.torch import load_file, save_file

    from qat.export.verify import verify_export

    model_dir = build("qwen3_moe", corpus)
    run = tmp_path / "run"
    assert main(["train", str(REPO / RECIPE), *overrides(corpus, model_dir, run, 4)]) == 0
    assert main(["export", str(run), "--format", "compressed-tensors", "--verify"]) == 0
    out = run / "export-compressed-tensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    dropped = {k: f for k, f in index["weight_map"].items() if re.search(r"layers\.0\.mlp\.experts\.\d+\.down_proj\.", k)}
    for f in set(dropped.values()):
        save_file({k: t for k, t in load_file(str(out / f)).items() if k not in dropped}, str(out / f))
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if k not in dropped}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    res = verify_export(out, "compressed-tensors", run / "final")
    assert not res["identical"] and "missing: model.layers.0.mlp.experts.down_proj" in res["load_problems"], res
