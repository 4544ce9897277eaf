"""Every shipped recipe loads and trains: two steps of `qat train RECIPE` with a tiny-model override.

A recipe that names a hub model (Llama-2/3, Qwen3, Qwen3-MoE) or a fixture runs on a local
random-weight model of the same architecture, built from its config; the data is a small local
text file, the precision is the CPU's. What each recipe sets for quantization, freezing,
distillation, LoRA and the teacher cache is kept (only a group size wider than the tiny model's
layers is narrowed). No fixtures and no downloads: this runs in both CI runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qat.cli import main
from qat.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml"))
ARCH = {"qwen3-8b": "qwen3", "qwen3-30b-a3b": "qwen3_moe", "moe-qat": "qwen3_moe"}  # by recipe folder or file; the rest are Llamas
SEP = "\n<|endoftext|>\n"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
            vocab_size=300, max_position_embeddings=128, tie_word_embeddings=False)


def tiny_config(arch: str):
    from transformers import AutoConfig

    extra = {"qwen3": {"head_dim": 16}, "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                                      "moe_intermediate_size": 32}}.get(arch, {})
    return AutoConfig.for_model(arch, **TINY, **extra)


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> dict:
    """A small text file, and per architecture a random-weight model with a tokenizer of 300 ids."""
    import torch
    from transformers import AutoModelForCausalLM

    from qat.data.corpus import train_tokenizer

    root = tmp_path_factory.mktemp("local")
    docs = [(REPO / f).read_text() for f in ("README.md", "qat/recipe.py", "qat/train/loop.py", "qat/io/rundir.py")]
    text = SEP.join(docs)
    (root / "text.txt").write_text(text)
    tok = train_tokenizer([text], 300)
    models = {}
    for arch in ("llama", "qwen3", "qwen3_moe"):
        torch.manual_seed(0)
        d = root / arch
        AutoModelForCausalLM.from_config(tiny_config(arch)).save_pretrained(d)
        tok.save_pretrained(d)
        models[arch] = d
    return {"text": root / "text.txt", "models": models}


def smoke_overrides(recipe_path: str, local: dict, out: Path) -> list[str]:
    r = load_recipe(REPO / recipe_path, check_files=False)
    o = [f"output_dir={out}", "data.source=files", f"data.files=[{local['text']}]", "data.name=null", "data.valid_split=null",
         "data.valid_files=null", "data.valid_fraction=0.25", "data.format=text", 'data.doc_separator="\\n<|endoftext|>\\n"', "data.seq_len=32", "data.max_train_tokens=2048", "data.max_valid_tokens=256",
         "train.max_steps=2", "train.micro_batch_size=2", "train.grad_accum=1", "train.warmup_steps=0", "train.mixed_precision=no",
         "eval.every=0", "eval.batch_size=2", "eval.max_batches=1", "tracking.wandb_project=null", "checkpoint.every=0",
         "checkpoint.resume=null"]
    if r.model.path is not None:
        p = Path(recipe_path)
        o.append(f"model.path={local['models'][ARCH.get(p.stem, ARCH.get(p.parent.name, 'llama'))]}")
    else:
        o += [f"model.config.{k}={v}" for k, v in TINY.items() if k != "vocab_size"] + ["tokenizer.train_vocab_size=300"]
    if r.teacher is not None and r.teacher.path is not None:
        o.append("teacher.path=null")
    if r.quant is not None and r.quant.group_size is not None and r.quant.group_size > 32:
        o.append("quant.group_size=16")
    if r.quant is not None and r.quant.init_from is not None:
        o.append("quant.init_from=null")
    if r.peft is not None:
        o.append("peft.init_tokens=256")
    return o


def test_every_recipe_is_in_the_matrix():
    assert len(RECIPES) >= 20 and "recipes/qwen3-30b-a3b/w4g128-kd-8gpu.yaml" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_trains_two_steps(recipe, local, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(REPO / recipe), *smoke_overrides(recipe, local, out)]) == 0
    assert (out / "final" / "config.json").is_file() and (out / "eval.json").is_file()


def test_precision_has_one_source(monkeypatch, tmp_path, capsys):
    """train.mixed_precision and the launch configuration's precision: null takes the launch's,
    and two different settings stop the run in one line naming both, before anything runs."""
    from conftest import PRETRAIN, SCRATCH_SMALL

    from qat.train.tracking import resolve_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` with a bf16 config exports
    assert main(["train", PRETRAIN, f"output_dir={tmp_path / 'run'}", *SCRATCH_SMALL, "train.mixed_precision=no"]) == 2
    err = capsys.readouterr().err
    assert "train.mixed_precision: the recipe says 'no' and the launch configuration" in err and "'bf16'" in err, err
    assert not (tmp_path / "run").exists()
    r = load_recipe(REPO / "recipes" / "llama3-8b" / "w4g128-kd-8gpu.yaml", check_files=False)
    assert r.train.mixed_precision is None and resolve_precision(r) == "bf16" and r.train.mixed_precision == "bf16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    r = load_recipe(REPO / "recipes" / "llama3-8b" / "w4g128-kd-8gpu.yaml", check_files=False)
    assert resolve_precision(r) == "no"


def test_the_recipe_reference_is_the_schema():
    """docs/recipes.md is `qat keys`' output: a key, default or description changed in the schema
    and not regenerated fails here (regenerate: qat keys > docs/recipes.md)."""
    from qat.recipe import reference_markdown, schema_keys

    text = (REPO / "docs" / "recipes.md").read_text()
    assert text == reference_markdown(), "docs/recipes.md is stale: run `qat keys > docs/recipes.md`"
    missing = [k for k in schema_keys() if f"| `{k}` |" not in text]
    assert not missing, missing


def test_a_family_without_sdpa_trains_on_the_attention_transformers_chooses(local, tmp_path):
    """model.attn_implementation null (the default) lets transformers pick the attention: Gemma-2,
    which has no SDPA path, trains and exports instead of stopping at load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.data.corpus import train_tokenizer

    d = tmp_path / "gemma2"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma2", **{**TINY, "head_dim": 16})).save_pretrained(d)
    train_tokenizer([local["text"].read_text()], 300).save_pretrained(d)
    recipe = "recipes/tiny/w4-ovfreeze.yaml"
    out = tmp_path / "run"
    o = [x for x in smoke_overrides(recipe, local, out) if not x.startswith("model.path=")]
    assert main(["train", str(REPO / recipe), *o, f"model.path={d}"]) == 0
    assert main(["export", str(out), "--format", "compressed-tensors", "--verify"]) == 0


def test_gpt2_conv1d_blocks_are_refused_in_one_line(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import PRETRAIN, SCRATCH_SMALL

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300, n_positions=128)).save_pretrained(d)
    assert main(["train", PRETRAIN, f"output_dir={tmp_path / 'run'}", *SCRATCH_SMALL, f"model.path={d}", "model.config=null",
                 "quant={bits: 4, group_size: 16}", "tokenizer.train_vocab_size=300"]) == 2
    err = capsys.readouterr().err
    assert "Conv1D layers (GPT-2 style, e.g. transformer.h.0.attn.c_attn)" in err and "Traceback" not in err, err
