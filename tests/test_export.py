"""`qat export`: packed checkpoints that reproduce final/ bit for bit (the exactness contract).

For int4/int8 x sym/asym x group/channel, a short QAT run on llama-tiny (ov-freeze, so frozen
layers are included) is exported to compressed-tensors ``pack-quantized`` and loaded back with
plain ``AutoModelForCausalLM.from_pretrained``: logits must equal those of final/ loaded the same
way (fp32: ``torch.equal``; bf16: within one ulp). GPTQ v1 (symmetric) is decoded with an
independent unpacker and compared with final/'s weights; its int4 ``qweight.T`` is compressed-
tensors' ``weight_packed``. Schemes no engine serves are refused with an offer of ``--format
fake``; adapters are kept separate or merged and re-quantized (``--merge-lora``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("compressed_tensors")

from conftest import require_tiny  # noqa: E402

from qat.cli import build_parser, main  # noqa: E402
from qat.export.verify import gptq_loader_missing  # noqa: E402
from qat.quant.grid import dequantize, quantize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY_RECIPE = str(REPO / "recipes/tiny/w4-ovfreeze.yaml")
QUICK = [  # a few steps on a few short blocks: the contract is about export, not training quality
    "train.max_steps=2",
    "train.warmup_steps=1",
    "train.micro_batch_size=2",
    "data.seq_len=64",
    "data.max_train_tokens=1024",
    "data.max_valid_tokens=512",
    "eval.batch_size=4",
    "eval.max_batches=1",
]
NO_TEACHER = ["teacher=null", "distill.kd_weight=0", "distill.ce_weight=1"]  # CE only: no teacher to load and run
SCHEMES = [(b, g, s) for b in (4, 8) for s in (True, False) for g in (64, None)]


def _id(scheme) -> str:
    b, g, s = scheme
    return f"int{b}-{'g' + str(g) if g else 'channel'}-{'sym' if s else 'asym'}"


def _paths() -> list[str]:
    return [
        f"model.path={SHARED / 'models' / 'llama-tiny'}",
        f"data.files={SHARED / 'data' / 'books.train.txt.gz'}",
        f"data.valid_files={SHARED / 'data' / 'books.valid.txt.gz'}",
    ]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny: one intra-op thread is as fast, and far faster on a shared, loaded CPU
    (idle OpenMP workers spin while they wait for a core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Lazily trained runs, one per (bits, group, symmetric, save_dtype, extra), shared by the module."""
    require_tiny()
    root = tmp_path_factory.mktemp("export-runs")
    cache: dict[tuple, Path] = {}

    def get(bits: int, group, symmetric: bool, save_dtype: str = "float32", *extra: str) -> Path:
        key = (bits, group, symmetric, save_dtype, extra)
        if key not in cache:
            out = root / f"run{len(cache)}"
            args = ["train", TINY_RECIPE, f"output_dir={out}", *_paths(), *QUICK, *NO_TEACHER]
            args += [f"quant.bits={bits}", f"quant.group_size={'null' if group is None else group}"]
            args += [f"quant.symmetric={str(symmetric).lower()}", f"model.save_dtype={save_dtype}", *extra]
            assert main(args) == 0
            cache[key] = out
        return cache[key]

    return get


def export(run: Path, out: Path, fmt: str = "compressed-tensors", *flags: str) -> int:
    return main(["export", str(run), "--format", fmt, "--out", str(out), *flags])


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 8192, (2, 96), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=ids()).logits


def ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing at |x| (one unit in the last place)."""
    x = x.float().abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
    return torch.pow(2.0, torch.floor(torch.log2(x)) - 7)


# -- compressed-tensors: the exactness contract ----------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES, ids=_id)
def test_compressed_tensors_logits_identical_fp32(runs, tmp_path, scheme, capsys):
    run = runs(*scheme)
    out = tmp_path / "ct"
    assert export(run, out) == 0
    printed = capsys.readouterr().out
    assert "size on disk" in printed and "vs bf16" in printed

    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    bits, g, sym = scheme
    w = group["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"], w["strategy"]) == (bits, g, sym, "group" if g else "channel")
    assert qc["ignore"] == ["lm_head"] and qc["dequantize"] is True  # the load hint (see qat/export/formats.py)

    state = load_file(str(out / "model.safetensors"))
    layers = json.loads((run / "final" / "qat_quant.json").read_text())["layers"]
    frozen = [n for n, i in layers.items() if i["frozen"]]
    assert frozen and all(f"{n}.weight_packed" in state for n in layers)  # ov-frozen layers packed too
    assert state["model.layers.0.self_attn.v_proj.weight_packed"].dtype == torch.int32
    assert state["model.embed_tokens.weight"].dtype == state["lm_head.weight"].dtype == torch.float32
    assert ("model.layers.0.self_attn.q_proj.weight_zero_point" in state) == (not sym)

    ref, exp = load(run / "final"), load(out)
    a, b = logits(ref), logits(exp)
    assert b.dtype == torch.float32
    assert torch.equal(a, b), (a - b).abs().max()
    ref_state = ref.state_dict()
    for name, t in exp.state_dict().items():  # decompressed on the first forward: every weight identical
        if name in ref_state:
            assert torch.equal(t, ref_state[name]), name

    entry = json.loads((run / "eval.json").read_text())["export"]["compressed-tensors"]
    assert "student" in json.loads((run / "eval.json").read_text())  # merged with the training results
    assert entry["weights_bytes"] > 0 and entry["bf16_weights_bytes"] > 0
    assert entry["quantized_layers_bytes"] < entry["quantized_layers_bf16_bytes"] * (0.6 if bits == 8 else 0.35)


@pytest.mark.parametrize("scheme", [(4, 64, True), (8, None, False)], ids=_id)
def test_compressed_tensors_bf16_within_one_ulp(runs, tmp_path, scheme):
    run = runs(*scheme, "bfloat16")
    out = tmp_path / "ct-bf16"
    assert export(run, out) == 0
    state = load_file(str(out / "model.safetensors"))
    assert state["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    assert state["model.embed_tokens.weight"].dtype == torch.bfloat16
    ref, exp = load(run / "final"), load(out)
    assert ref.dtype == exp.dtype == torch.bfloat16
    a, b = logits(ref), logits(exp)
    assert ((a.float() - b.float()).abs() <= ulp_bf16(a)).all()
    ref_state = ref.state_dict()
    for name, t in exp.state_dict().items():
        if name in ref_state:
            assert torch.equal(t, ref_state[name]), name


def test_mixed_int4_int8_is_one_config_group_per_scheme(runs, tmp_path, capsys):
    run = runs(4, 64, True, "float32", "quant.overrides=[{pattern: mlp.down_proj, bits: 8, per_channel: true}]")
    out = tmp_path / "ct"
    assert export(run, out) == 0
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    by_bits = {g["weights"]["num_bits"]: g for g in groups}
    assert set(by_bits) == {4, 8} and by_bits[8]["weights"]["strategy"] == "channel"
    assert by_bits[8]["targets"] == [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    assert "dequantize" not in json.loads((out / "config.json").read_text())["quantization_config"]
    assert torch.equal(logits(load(run / "final")), logits(load(out)))
    assert export(run, tmp_path / "gptq", "gptq") == 2  # one bits/group_size per GPTQ config
    assert "--format compressed-tensors" in capsys.readouterr().err


def test_mixed_precision_with_asymmetric_layers_refused(runs, tmp_path, capsys):
    run = tmp_path / "mixed-asym"
    shutil.copytree(runs(4, 64, True), run)
    path = run / "final" / "qat_quant.json"
    data = json.loads(path.read_text())
    for name, info in data["layers"].items():
        if name.endswith("down_proj"):
            info.update(bits=8, group_size=None, symmetric=False)
    path.write_text(json.dumps(data))
    assert export(run, tmp_path / "ct") == 2
    err = capsys.readouterr().err
    assert "mixed precision" in err and "asymmetric" in err and "--format fake" in err


def test_final_defaults_to_the_source_checkpoint_dtype(tmp_path):
    """llama-tiny ships in bf16, so with no model.save_dtype final/ and its export are bf16 (what
    llm-compressor writes and vLLM serves), still exactly on the grid; float32 stays available."""
    require_tiny()
    assert json.loads((SHARED / "models" / "llama-tiny" / "config.json").read_text()).get("dtype") == "bfloat16"
    out = tmp_path / "default"
    assert main(["train", TINY_RECIPE, f"output_dir={out}", *_paths(), *QUICK, *NO_TEACHER, "train.max_steps=0"]) == 0
    final = load_file(str(out / "final" / "model.safetensors"))
    qparams = load_file(str(out / "final" / "qat" / "qparams.safetensors"))
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    assert {t.dtype for t in qparams.values()} == {torch.bfloat16}
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    name = "model.layers.1.mlp.down_proj"
    w, scale, zero = final[f"{name}.weight"], qparams[f"{name}.weight_scale"], qparams[f"{name}.weight_zero_point"]
    codes = quantize(w.float(), scale.float(), zero.float(), 4, True, 64)
    assert torch.equal(dequantize(codes, scale, zero, 64, torch.bfloat16), w)  # on the grid, in bf16 arithmetic
    assert export(out, tmp_path / "ct") == 0
    info = json.loads((out / "eval.json").read_text())["export"]["compressed-tensors"]
    # the embeddings and lm_head (71 % of llama-tiny) stay bf16; the int4 g64 layers take
    # (4 + 16 / 64) / 16 = 0.27 of bf16 (an fp32 export was 1.09 x bf16 in all)
    assert info["dtype"] == "bfloat16" and info["ratio_vs_bf16"] < 0.85, info
    assert info["quantized_layers_bytes"] / info["quantized_layers_bf16_bytes"] < 0.28, info

    fp32 = tmp_path / "fp32"
    assert main(["train", TINY_RECIPE, f"output_dir={fp32}", *_paths(), *QUICK, *NO_TEACHER, "train.max_steps=0",
                 "model.save_dtype=float32"]) == 0
    assert {t.dtype for t in load_file(str(fp32 / "final" / "model.safetensors")).values()} == {torch.float32}


def test_sharded_final_reloads_evaluates_and_exports_as_one_file(runs, tmp_path, monkeypatch):
    """final/ above the shard size is numbered shards + index (as hub checkpoints ship): the same
    run written in 200 KB shards loads to the same weights, evaluates to the same perplexity and
    exports to the same compressed-tensors model as the one-file final/."""
    import qat.io.final

    one = runs(4, 64, True)
    monkeypatch.setattr(qat.io.final, "SHARD_SIZE", "200KB")
    out = tmp_path / "sharded"
    args = ["train", TINY_RECIPE, f"output_dir={out}", *_paths(), *QUICK, *NO_TEACHER, "quant.bits=4", "quant.group_size=64",
            "quant.symmetric=true", "model.save_dtype=float32"]
    assert main(args) == 0
    final = out / "final"
    shards = sorted(p.name for p in final.glob("model-*.safetensors"))
    index = json.loads((final / "model.safetensors.index.json").read_text())
    assert len(shards) >= 5 and not (final / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    a, b = load(one / "final").state_dict(), load(final).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ev = lambda run: json.loads((run / "eval.json").read_text())["student"]  # noqa: E731
    assert ev(out)["ppl"] == ev(one)["ppl"] and ev(out)["tokens"] == ev(one)["tokens"]
    assert export(out, tmp_path / "ct-sharded") == 0 and export(one, tmp_path / "ct-one") == 0
    assert torch.equal(logits(load(tmp_path / "ct-sharded")), logits(load(tmp_path / "ct-one")))


def test_verify_flag_and_overwrite(runs, tmp_path, capsys):
    run = runs(4, 64, True)
    assert export(run, tmp_path / "ct", "compressed-tensors", "--verify") == 0
    assert "max abs difference 0 (identical)" in capsys.readouterr().out
    assert export(run, tmp_path / "ct", "compressed-tensors") == 2  # not over an existing export
    assert "--overwrite" in capsys.readouterr().err
    assert export(run, tmp_path / "ct", "compressed-tensors", "--overwrite") == 0


def test_gptq_verify_says_what_the_real_loader_needs(runs, tmp_path, capsys):
    run = runs(4, 64, True)
    assert export(run, tmp_path / "gptq", "gptq", "--verify") == 0
    out = capsys.readouterr().out
    assert "gptq tensors unpacked vs final/ weights: max abs difference 0 (identical)" in out
    missing = gptq_loader_missing()
    if missing:
        assert f"verify: not run: transformers loads GPTQ through optimum and gptqmodel; missing {', '.join(missing)}" in out
    else:
        assert "verify: transformers + optimum + gptqmodel: logits vs final/" in out


@pytest.mark.skipif(bool(gptq_loader_missing()),
                    reason="transformers' GPTQ loader needs optimum and gptqmodel (gptqmodel 7.7 wants torch >= 2.14.1)")
def test_gptq_export_loads_in_plain_transformers(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    run = runs(4, 64, True)
    assert export(run, tmp_path / "gptq", "gptq") == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq", device_map="cpu").eval()
    ref = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    ids = torch.randint(0, ref.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float()
    assert (a - b).abs().max() < 0.05 * b.abs().max()  # GPTQ kernels compute in their own precision


# -- GPTQ v1 ------------------------------------------------------------------------------------
def gptq_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A direct reading of the GPTQ v1 layout: element i of input column k sits in qweight row
    k // (32/bits) at bit (k % (32/bits)) * bits; qzeros the same along the output dim, + 1."""
    res = {}
    for key in [k for k in state if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        qweight, qzeros, scales, g_idx = (state[f"{name}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx"))
        in_f, out_f = g_idx.numel(), scales.shape[1]
        bits = 32 * qweight.shape[0] // in_f
        per = 32 // bits
        k = torch.arange(in_f)
        q = (qweight[k // per] >> ((k % per) * bits).view(-1, 1).to(torch.int32)) & (2**bits - 1)  # [in, out]
        o = torch.arange(out_f)
        z = ((qzeros[:, o // per] >> ((o % per) * bits).to(torch.int32)) & (2**bits - 1)) + 1  # [groups, out]
        gi = g_idx.long()
        res[name] = ((q.to(scales.dtype) - z[gi].to(scales.dtype)) * scales[gi]).T
        res[name].zeros = z  # the decoded zero-points, for the checks
    return res


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s[2]], ids=_id)
def test_gptq_layout_reproduces_final(runs, tmp_path, scheme):
    run = runs(*scheme)
    out = tmp_path / "gptq"
    assert export(run, out, "gptq") == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    bits, g, _ = scheme
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == bits and cfg["sym"] is True and cfg["desc_act"] is False
    assert cfg["group_size"] == (g or -1) and cfg["checkpoint_format"] == "gptq"
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == bits

    state = load_file(str(out / "model.safetensors"))
    final = load_file(str(run / "final" / "model.safetensors"))
    layers = json.loads((run / "final" / "qat_quant.json").read_text())["layers"]
    decoded = gptq_weights(state)
    assert set(decoded) == set(layers)
    for name, w in decoded.items():
        assert torch.equal(w, final[f"{name}.weight"]), name
        assert torch.equal(state[f"{name}.g_idx"], torch.arange(w.shape[1], dtype=torch.int32) // (g or w.shape[1]))
        assert (w.zeros == 2 ** (bits - 1)).all(), name  # symmetric: zero 2^(b-1), stored as zero - 1
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(state[name], final[name])


@pytest.mark.parametrize("scheme", [(4, 64, True), (4, None, True)], ids=_id)
def test_gptq_int4_sym_qweight_is_ct_weight_packed_transposed(runs, tmp_path, scheme):
    run = runs(*scheme)
    assert export(run, tmp_path / "ct") == 0 and export(run, tmp_path / "gptq", "gptq") == 0
    ct = load_file(str(tmp_path / "ct" / "model.safetensors"))
    gq = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    names = [k[: -len(".qweight")] for k in gq if k.endswith(".qweight")]
    assert len(names) == 28
    for n in names:
        assert torch.equal(gq[f"{n}.qweight"].T, ct[f"{n}.weight_packed"]), n
        assert torch.equal(gq[f"{n}.scales"].T, ct[f"{n}.weight_scale"]), n


def test_gptq_refuses_asymmetric(runs, tmp_path, capsys):
    run = runs(4, 64, False)
    assert export(run, tmp_path / "gptq", "gptq") == 2
    err = capsys.readouterr().err
    assert "asymmetric" in err and "--format compressed-tensors" in err
    assert not (tmp_path / "gptq").exists()


# -- what no engine serves: refused, with --format fake offered -------------------------------
def test_int2_mixed_precision_refused_and_fake_roundtrips(runs, tmp_path, capsys):
    run = runs(4, 64, True, "float32", "quant.overrides=[{pattern: mlp.down_proj, bits: 2}]")
    for fmt in ("compressed-tensors", "gptq"):
        assert export(run, tmp_path / fmt, fmt) == 2
        err = capsys.readouterr().err
        assert "int2" in err and "mixed precision" in err and "--format fake" in err, err
        assert not (tmp_path / fmt).exists()
    out = tmp_path / "fake"
    assert export(run, out, "fake") == 0
    layers = json.loads((out / "qat_quant.json").read_text())["layers"]
    assert layers == json.loads((run / "final" / "qat_quant.json").read_text())["layers"]
    assert layers["model.layers.0.mlp.down_proj"]["bits"] == 2
    assert torch.equal(logits(load(run / "final")), logits(load(out)))
    qp, w = load_file(str(out / "qat" / "qparams.safetensors")), load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"  # codes * scale reproduce the saved weights
    s, z = qp[f"{name}.weight_scale"], qp[f"{name}.weight_zero_point"]
    codes = torch.round(w[f"{name}.weight"].double().view(s.shape[0], s.shape[1], -1) / s.double().unsqueeze(-1)).view_as(w[f"{name}.weight"])
    assert codes.min() >= -2 and codes.max() <= 1
    assert torch.equal(dequantize(codes.to(torch.int32), s, z, 64), w[f"{name}.weight"])


def test_int3_refused_before_loading_anything(runs, tmp_path, capsys):
    run = tmp_path / "int3"
    shutil.copytree(runs(4, 64, True), run)
    path = run / "final" / "qat_quant.json"
    data = json.loads(path.read_text())
    for info in data["layers"].values():
        info["bits"] = 3
    path.write_text(json.dumps(data))
    assert export(run, tmp_path / "ct") == 2
    err = capsys.readouterr().err
    assert "int3" in err and "--format fake" in err and "mixed" not in err


def test_bad_run_dir_is_a_clear_error(tmp_path, capsys):
    assert export(tmp_path / "nope", tmp_path / "out") == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert export(tmp_path / "empty", tmp_path / "out") == 2
    assert "not a qat run directory" in capsys.readouterr().err


# -- low-rank terms: kept separate, or merged and re-quantized --------------------------------
@pytest.fixture(scope="module")
def adapter_run(runs, tmp_path_factory):
    """A copy of the int4 g64 run with a PEFT LoRA adapter (q_proj/v_proj, random B) in final/adapter."""
    from peft import LoraConfig, get_peft_model

    run = tmp_path_factory.mktemp("adapter") / "run"
    shutil.copytree(runs(4, 64, True), run)
    model = load(run / "final")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(run / "final" / "adapter")
    return run


def test_adapter_kept_separate(adapter_run, tmp_path, capsys):
    from peft import PeftModel

    out = tmp_path / "ct"
    assert export(adapter_run, out) == 0
    assert "kept separate" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_config.json").is_file()
    entry = json.loads((adapter_run / "eval.json").read_text())["export"]["compressed-tensors"]
    assert "kept separate" in entry["adapter"] and entry["adapter_bytes"] > 0
    ref = PeftModel.from_pretrained(load(adapter_run / "final"), str(adapter_run / "final" / "adapter")).eval()
    exp = PeftModel.from_pretrained(load(out), str(out / "adapter")).eval()
    assert torch.equal(logits(ref), logits(exp))


def test_merge_lora_requantizes_and_reports_logit_change(adapter_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert export(adapter_run, out, "compressed-tensors", "--merge-lora") == 0
    printed = capsys.readouterr().out
    assert "--merge-lora" in printed and "logit change" in printed
    assert not (out / "adapter").exists()
    m = json.loads((adapter_run / "eval.json").read_text())["export"]["compressed-tensors"]["merge_lora"]
    assert 0 < m["max_abs_logit_change"] < float("inf") and 0 < m["mean_abs_logit_change"] <= m["max_abs_logit_change"]
    assert m["adapter_effect_max_abs"] > 0
    assert m["requantized_layers"] == 8  # q_proj and v_proj of 4 blocks
    # still a packed int4 checkpoint; layers the adapter does not touch keep their exact weights
    assert "model.layers.0.self_attn.q_proj.weight_packed" in load_file(str(out / "model.safetensors"))
    base, merged = load(adapter_run / "final").state_dict(), load(out).state_dict()
    assert not torch.equal(base["model.layers.0.self_attn.q_proj.weight"], merged["model.layers.0.self_attn.q_proj.weight"])
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.2.mlp.down_proj.weight", "lm_head.weight"):
        assert torch.equal(base[name], merged[name]), name


def test_merge_lora_without_adapter_is_refused(runs, tmp_path, capsys):
    assert export(runs(8, None, True), tmp_path / "m", "compressed-tensors", "--merge-lora") == 2
    assert "no adapter/" in capsys.readouterr().err


# -- PTQ runs (qat ptq) ----------------------------------------------------------------------
def _ptq_methods(wanted=("rtn", "gptq")) -> list[str]:
    """The ``qat ptq --method`` choices among ``wanted`` (none while the command is absent)."""
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    if "ptq" not in sub.choices:
        return []
    method = next((a for a in sub.choices["ptq"]._actions if "--method" in a.option_strings), None)
    return [m for m in wanted if method is None or method.choices is None or m in method.choices]


def ptq_run(method: str, scheme, out: Path) -> Path:
    bits, g, sym = scheme
    args = ["ptq", TINY_RECIPE, f"output_dir={out}", *_paths(), *QUICK[3:], "ptq.calib_tokens=512"]
    args += [f"quant.bits={bits}", f"quant.group_size={'null' if g is None else g}", f"quant.symmetric={str(sym).lower()}"]
    assert main([*args, "--method", method]) == 0
    return out


@pytest.mark.parametrize("method,scheme", [("rtn", (4, 64, True)), ("gptq", (8, None, False)), ("gptq", (4, 64, True))],
                         ids=["rtn-int4-g64-sym", "gptq-int8-channel-asym", "gptq-int4-g64-sym"])
def test_ptq_run_exports_exactly(method, scheme, tmp_path):
    require_tiny()
    if method not in _ptq_methods():
        pytest.skip(f"`qat ptq --method {method}` is not available in this checkout (qat/ptq not landed)")
    sym = scheme[2]
    run = ptq_run(method, scheme, tmp_path / "ptq")
    out = tmp_path / "ct"
    assert export(run, out) == 0
    assert torch.equal(logits(load(run / "final")), logits(load(out)))
    if sym:
        assert export(run, tmp_path / "gptq", "gptq") == 0
        final = load_file(str(run / "final" / "model.safetensors"))
        for name, w in gptq_weights(load_file(str(tmp_path / "gptq" / "model.safetensors"))).items():
            assert torch.equal(w, final[f"{name}.weight"]), name


def test_qera_adapter_kept_separate_beside_packed_base(tmp_path, capsys):
    """QERA's low-rank terms (final/adapter) stay a PEFT adapter next to the exact packed base."""
    require_tiny()
    if "qera-exact" not in _ptq_methods(("qera-exact",)):
        pytest.skip("`qat ptq --method qera-exact` is not available in this checkout (qat/ptq not landed)")
    from peft import PeftModel

    run = ptq_run("qera-exact", (4, 64, True), tmp_path / "qera")
    assert (run / "final" / "adapter" / "adapter_config.json").is_file()
    out = tmp_path / "ct"
    assert export(run, out) == 0
    assert "kept separate" in capsys.readouterr().out
    assert torch.equal(logits(load(run / "final")), logits(load(out)))  # the base, exactly
    ref = PeftModel.from_pretrained(load(run / "final"), str(run / "final" / "adapter")).eval()
    exp = PeftModel.from_pretrained(load(out), str(out / "adapter")).eval()
    assert torch.equal(logits(ref), logits(exp))  # base + low-rank terms, exactly


def test_merge_lora_on_the_seq_grid_requantizes_onto_it(runs, tmp_path, capsys):
    """--merge-lora on a SEQ run (quant.grid: seq): the touched layers are re-quantized on SEQ's grid
    (zero-point 1.5, weights at ±0.5 / ±1.5 times their new scales), the others keep their weights;
    compressed-tensors holds it as int4 with half the scales, exactly."""
    from peft import LoraConfig, get_peft_model

    run = tmp_path / "run"
    shutil.copytree(runs(2, 64, False, "float32", "quant.grid=seq"), run)
    peft_model = get_peft_model(load(run / "final"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    peft_model.save_pretrained(run / "final" / "adapter")
    assert export(run, tmp_path / "ct", "compressed-tensors", "--merge-lora") == 0  # as int4, half the scales
    out = tmp_path / "fake"
    assert export(run, out, "fake", "--merge-lora") == 0
    assert "logit change" in capsys.readouterr().out
    assert torch.equal(logits(load(tmp_path / "ct")), logits(load(out)))  # the packed int4 export is the merged SEQ model
    base, merged = load_file(str(run / "final" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    qp = load_file(str(out / "qat" / "qparams.safetensors"))
    for i in range(4):
        name = f"model.layers.{i}.self_attn.q_proj"
        w, s, z = merged[f"{name}.weight"].double(), qp[f"{name}.weight_scale"].double(), qp[f"{name}.weight_zero_point"]
        assert not torch.equal(merged[f"{name}.weight"], base[f"{name}.weight"]) and torch.equal(z, torch.full_like(z, 1.5))
        steps = w.view(s.shape[0], s.shape[1], -1) / s.unsqueeze(-1)
        assert (steps - torch.round(steps * 2) / 2).abs().max() < 1e-5
        assert set((torch.round(steps * 2) / 2).unique().tolist()) <= {-1.5, -0.5, 0.5, 1.5}
        k = f"model.layers.{i}.self_attn.k_proj.weight"
        assert torch.equal(merged[k], base[k])


def test_the_2bit_default_exports_exactly_as_a_symmetric_integer_grid(tmp_path, capsys):
    """No fixtures: a W2 run on the default SEQ grid, exported to compressed-tensors as symmetric
    int4 (vLLM's WNA16 widths) and, with --any-bits, int3, each with codes 2u - 3 and half the
    scales; both load back in transformers with final/'s logits exactly, and so does GPTQ int4."""
    from conftest import PRETRAIN, SCRATCH_SMALL
    from safetensors.torch import load_file

    run = tmp_path / "w2"
    assert main(["train", PRETRAIN, f"output_dir={run}", *SCRATCH_SMALL, "model.config.hidden_size=64", "model.config.intermediate_size=128",
                 "train.max_steps=2", "quant={bits: 2, group_size: 32}"]) == 0
    layers = json.loads((run / "final" / "qat_quant.json").read_text())["layers"]
    assert {i["grid"] for i in layers.values()} == {"seq"}
    qp = load_file(str(run / "final" / "qat" / "qparams.safetensors"))
    for flags, bits in (([], 4), (["--any-bits"], 3)):
        out = tmp_path / f"ct{bits}"
        assert export(run, out, "compressed-tensors", "--verify", *flags) == 0
        assert "max abs difference 0 (identical)" in capsys.readouterr().out
        qc = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
        assert (qc["num_bits"], qc["symmetric"], qc["group_size"]) == (bits, True, 32)
        packed = load_file(str(out / "model.safetensors"))
        name = next(iter(layers))
        assert torch.equal(packed[f"{name}.weight_scale"].float(), qp[f"{name}.weight_scale"].float() / 2)
        assert json.loads((run / "eval.json").read_text())["export"]["compressed-tensors"]["seq_as_int"].startswith(f"{len(layers)} SEQ layers")
        small = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(1))  # the run's own 300-id vocabulary
        with torch.no_grad():
            assert torch.equal(load(out)(input_ids=small).logits, load(run / "final")(input_ids=small).logits)
    assert export(run, tmp_path / "gptq", "gptq", "--verify") == 0
    assert "max abs difference 0 (identical)" in capsys.readouterr().out
