"""LoRA-QAT (qat/train/lora.py): merged-weight QAT exactness, the separate (QLoRA-style) adapter,
adapter initialisation (gaussian / loftq / qera), and 8-bit bitsandbytes optimizers."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import LLAMA_TINY, make_tiny_llama, require_tiny
from safetensors.torch import load_file

from qat.io.final import save_final
from qat.quant import QuantScheme, qat_linears, quantize_model
from qat.quant.grid import fake_quantize, minmax_qparams
from qat.recipe import PeftSection, RecipeError, load_recipe
from qat.train.lora import LoRAQATLinear, apply_lora, merge_lora_

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes/tiny/w4-ovfreeze.yaml")
# final/ in float32 (not the fixture's bf16): these tests compare it with fp32 fake-quant bit for bit
FAST = ["data.max_train_tokens=4096", "data.max_valid_tokens=1024", "train.micro_batch_size=4", "eval.batch_size=8", "model.save_dtype=float32"]


def _recipe(**peft):
    return SimpleNamespace(peft=PeftSection(**peft))


def _quantized(seed=0, learnable=False, grid="int"):
    """W4g32 symmetric on the integer grid; W2g32 on SEQ's grid."""
    model = make_tiny_llama(seed)
    seq = grid == "seq"
    quantize_model(model, QuantScheme(2 if seq else 4, 32, not seq, "minmax", learnable, grid=grid))
    return model


def _ids(n=2, t=16, seed=1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


# -- (b) merged-weight QAT -----------------------------------------------------------------
@pytest.mark.parametrize("grid", ["int", "seq"])
@pytest.mark.parametrize("learnable", [False, True])
def test_merged_requantized_model_reproduces_trained_logits_exactly(tmp_path, learnable, grid):
    from transformers import AutoModelForCausalLM

    model = apply_lora(_quantized(learnable=learnable, grid=grid), _recipe(mode="merged", r=4, alpha=8))
    layers = [m for m in model.modules() if isinstance(m, LoRAQATLinear)]
    assert len(layers) == 14 and all(m.lora_scaling == 2.0 for m in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # a few optimizer steps: the adapters move, W does not
    w0 = layers[0].weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(layers[0].weight, w0) and layers[0].lora_B.abs().max() > 0
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    assert merge_lora_(model) == 14
    save_final(model, None, tmp_path / "final", torch.float32)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(final(input_ids=ids).logits, trained)


@pytest.mark.parametrize("grid", ["int", "seq"])
def test_merged_forward_quantizes_w_plus_scaled_ba(grid):
    model = apply_lora(_quantized(grid=grid), _recipe(mode="merged", r=2, alpha=4))
    layer = next(m for m in model.modules() if isinstance(m, LoRAQATLinear))
    with torch.no_grad():
        layer.lora_B.normal_()
    w = layer.weight + 2.0 * layer.lora_B @ layer.lora_A
    s = layer.scheme
    scale, zero = minmax_qparams(w.detach(), s.bits, s.group_size, s.symmetric, layer.clip_ratio, s.seq)
    assert torch.equal(zero, torch.full_like(zero, 1.5 if grid == "seq" else 0.0))
    assert torch.equal(layer.fake_quantized_weight(), fake_quantize(w.detach(), scale, zero, s.bits, s.symmetric, s.group_size))


def test_peft_recipe_checks():
    with pytest.raises(ValueError, match="dropout"):
        PeftSection(mode="merged", dropout=0.1)
    with pytest.raises(ValueError, match="peft.init"):
        PeftSection(mode="merged", init="qera")
    with pytest.raises(RecipeError, match="peft: LoRA-QAT needs a quant section"):
        load_recipe(TINY, ["quant=null", "freeze.policy=none", "peft.r=4"], check_files=False)
    with pytest.raises(RecipeError, match="peft.target_modules"):
        apply_lora(_quantized(), _recipe(target_modules=["nope"]))


# -- (a) separate adapter, and initialisation ------------------------------------------------
def _out_err(model, ref, ids):
    with torch.no_grad():
        return (model(input_ids=ids).logits - ref(input_ids=ids).logits).pow(2).mean().item()


@pytest.mark.parametrize("grid", ["int", "seq"])
def test_separate_base_frozen_on_grid_and_inits(grid):
    from qat.data import TokenBlocks

    ref = make_tiny_llama(0)
    ids = _ids(4, 32, seed=3)
    calib = TokenBlocks(_ids(16, 32, seed=4))
    errs = {}
    for init in ("gaussian", "loftq", "qera"):
        model = apply_lora(_quantized(grid=grid), _recipe(mode="separate", r=8, alpha=8, init=init), calib=calib)
        inner = model.base_model.model
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        for layer in qat_linears(inner).values():
            assert layer.frozen  # the quantized base is frozen and on its grid
            assert torch.equal(layer.fake_quantized_weight(), layer.weight)
        errs[init] = _out_err(model, ref, ids)
    # gaussian starts at the quantized base (B = 0); loftq and qera start closer to the FP model
    base = _quantized(grid=grid)
    for layer in qat_linears(base).values():
        layer.freeze()
    assert errs["gaussian"] == pytest.approx(_out_err(base, ref, ids), rel=1e-5)
    assert errs["qera"] < 0.8 * errs["gaussian"], errs
    assert errs["loftq"] < errs["gaussian"], errs


# -- end to end on llama-tiny ----------------------------------------------------------------
@pytest.fixture
def _tiny(monkeypatch):
    require_tiny()
    monkeypatch.chdir(REPO)


def _train(out, *overrides):
    from qat.cli import main

    assert main(["train", TINY, f"output_dir={out}", *FAST, *overrides]) == 0
    return out


def test_train_merged_final_matches_trained_checkpoint_logits(_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from qat.io.models import load_student, model_config
    from qat.policy import build_student_quant

    out = _train(tmp_path / "merged", "peft.mode=merged", "peft.r=4", "train.max_steps=3", "checkpoint.every=3", "train.lr=1e-2")
    recipe = load_recipe(out / "recipe.yaml", check_files=False)
    config = model_config(recipe, None)
    student = load_student(recipe, config)
    build_student_quant(student, recipe)
    student = apply_lora(student, recipe, init=False)
    state = load_file(str(out / "checkpoints" / "step-3" / "model.safetensors")) if (out / "checkpoints" / "step-3").is_dir() else None
    if state is None:
        ckpt = sorted((out / "checkpoints").iterdir())[-1]
        state = load_file(str(ckpt / "model.safetensors"))
    student.load_state_dict(state)
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in state.items())
    ids = _ids(2, 32, seed=5) % 8192
    final = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(final(input_ids=ids).logits, student.eval()(input_ids=ids).logits)
    assert not (out / "final" / "adapter").exists()
    assert json.loads((out / "eval.json").read_text())["student"]["ppl"] > 0


def test_train_separate_writes_adapter_and_frozen_base(_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from qat.io.final import load_quant_layers
    from qat.io.models import load_model_dir

    out = _train(tmp_path / "sep", "peft.mode=separate", "peft.r=4", "peft.init=qera", "peft.init_tokens=1024", "train.max_steps=2", "train.lr=1e-2")
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()
    final = load_file(str(out / "final" / "model.safetensors"))
    orig = AutoModelForCausalLM.from_pretrained(LLAMA_TINY, dtype=torch.float32).state_dict()
    layers = load_quant_layers(out / "final")
    name = "model.layers.0.self_attn.q_proj"
    s = layers[name]
    w = orig[name + ".weight"]
    scale, zero = minmax_qparams(w, s["bits"], s["group_size"], s["symmetric"])
    # the base is exactly the RTN of the original weight: training moved only the adapter
    assert torch.equal(final[name + ".weight"], fake_quantize(w, scale, zero, s["bits"], s["symmetric"], s["group_size"]))
    model, _ = load_model_dir(out / "final")
    assert hasattr(model, "peft_config")
    assert json.loads((out / "eval.json").read_text())["student"]["ppl"] > 0


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_bnb_8bit_optimizers_train_on_cpu(_tiny, tmp_path, optimizer):
    pytest.importorskip("bitsandbytes")
    out = _train(tmp_path / optimizer, f"train.optimizer={optimizer}", "train.max_steps=2", "train.log_every=1", "data.max_valid_tokens=null", "data.valid_files=null")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    assert (out / "final" / "model.safetensors").is_file()
