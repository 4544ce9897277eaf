"""QAT levers of the quality study: when fake-quant starts (``quant.start_step``), a delayed freeze
(``freeze.start_step``), freezing weights but not learnable scales (``freeze.scales: false``), and
starting from a PTQ result (``quant.init_from``). Each test shows the lever does what the recipe
reference says; resume across a schedule boundary is bit-identical."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qat.cli import main
from qat.quant import apply_freeze, qat_linears, quantize_model
from qat.quant.apply import reinit_qparams, set_fake_quant
from qat.quant.grid import group_view
from qat.quant.scheme import QuantScheme
from tests.conftest import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes/tiny/w4-ovfreeze.yaml")
FAST = ["data.max_train_tokens=8192", "data.max_valid_tokens=2048", "train.micro_batch_size=4", "eval.batch_size=8", "train.log_every=1"]
from conftest import needs_tiny as needs_fixtures  # noqa: E402


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def run(out: Path, *overrides: str) -> Path:
    assert main(["train", TINY, f"output_dir={out}", *FAST, *overrides]) == 0
    return out


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


# -- in memory ---------------------------------------------------------------------------------
def test_fake_quant_off_is_the_plain_model_and_reinit_matches_a_fresh_wrap():
    ref = make_tiny_llama()
    model = make_tiny_llama()
    quantize_model(model, QuantScheme(bits=3, group_size=32, scale_init="mse", learnable=True))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    set_fake_quant(model, False)
    assert torch.equal(model(ids).logits, ref(ids).logits)
    set_fake_quant(model, True)
    assert (model(ids).logits - ref(ids).logits).abs().max() > 1e-3
    # weights move (plain fine-tuning phase), then the switch re-initialises the qparams in place
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    layer = next(iter(qat_linears(model).values()))
    scale_param = layer.weight_scale
    fresh = make_tiny_llama()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "weight_scale" not in k and "zero_point" not in k}, strict=False)
    quantize_model(fresh, QuantScheme(bits=3, group_size=32, scale_init="mse", learnable=True))
    assert reinit_qparams(model) == len(qat_linears(model))
    assert layer.weight_scale is scale_param  # the optimizer's tensor, updated in place
    for name, m in qat_linears(model).items():
        assert torch.equal(m.weight_scale, qat_linears(fresh)[name].weight_scale)


def test_freeze_weights_only_keeps_training_learnable_scales():
    model = make_tiny_llama()
    quantize_model(model, QuantScheme(bits=4, group_size=32, learnable=True))
    frozen = apply_freeze(model, "ov-freeze", scales=False)
    layers = qat_linears(model)
    v = layers[frozen[0]]
    assert not v.weight.requires_grad and v.weight_scale.requires_grad and not v.frozen
    w0, s0 = v.weight.detach().clone(), v.weight_scale.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(v.weight, w0)  # the latent weight stays
    assert not torch.equal(v.weight_scale, s0)  # its scales train
    # scales=True (the default) fixes both
    model2 = make_tiny_llama()
    quantize_model(model2, QuantScheme(bits=4, group_size=32, learnable=True))
    name = apply_freeze(model2, "ov-freeze")[0]
    assert qat_linears(model2)[name].frozen and not any(p.requires_grad for p in qat_linears(model2)[name].parameters())


# -- recipe checks -------------------------------------------------------------------------------
@needs_fixtures
@pytest.mark.parametrize(
    "overrides, key, expect",
    [
        (["freeze.scales=false"], "freeze.scales", "needs quant.learnable: true"),
        (["freeze.policy=none", "freeze.start_step=3"], "freeze.policy", "need a freeze policy"),
        (["quant.init_from=/nonexistent/run"], "quant.init_from", "not a finished qat run directory"),
        (["peft={r: 4}", "quant.start_step=2"], "peft", "not supported with LoRA-QAT"),
    ],
)
def test_lever_recipe_errors(overrides, key, expect, tmp_path, capsys):
    assert main(["train", TINY, f"output_dir={tmp_path}/x", *overrides]) == 2
    err = capsys.readouterr().err
    assert f"{key}:" in err and expect in err
    assert not (tmp_path / "x").exists()


# -- end to end --------------------------------------------------------------------------------
@needs_fixtures
def test_quant_start_step_is_plain_kd_until_then(tmp_path):
    """Steps 1-3 of a run with quant.start_step=3 are those of plain KD fine-tuning (quant: null),
    bit for bit; step 4 is not (fake-quant is on)."""
    common = ["freeze.policy=none", "train.schedule=constant", "train.max_steps=4"]
    delayed = run(tmp_path / "delayed", *common, "quant.start_step=3")
    plain = run(tmp_path / "plain", *common, "quant=null")
    a, b = losses(delayed), losses(plain)
    assert a[:3] == b[:3] and a[3] != b[3]
    meta = json.loads((delayed / "final" / "qat_quant.json").read_text())["layers"]
    assert len(meta) == 28  # final/ is still the quantized model


@needs_fixtures
def test_delayed_freeze_fixes_layers_at_their_step_n_values(tmp_path):
    """ov-freeze at step 3: v/o in final/ equal the on-grid v/o of a run stopped at step 3 (same
    trajectory until then), while q/k go on training."""
    common = ["train.schedule=constant", "freeze.start_step=3"]
    stop = weights(run(tmp_path / "stop", *common, "train.max_steps=3"))
    go = weights(run(tmp_path / "go", *common, "train.max_steps=6"))
    meta = json.loads((tmp_path / "go" / "final" / "qat_quant.json").read_text())["layers"]
    ov = [n for n, d in meta.items() if d["frozen"]]
    assert len(ov) == 8 and all(n.endswith(("v_proj", "o_proj")) for n in ov)
    assert all(torch.equal(stop[f"{n}.weight"], go[f"{n}.weight"]) for n in ov)
    assert not torch.equal(stop["model.layers.0.self_attn.q_proj.weight"], go["model.layers.0.self_attn.q_proj.weight"])


@needs_fixtures
def test_resume_across_schedule_boundaries_is_bit_identical(tmp_path):
    """LSQ scales, fake-quant from step 3, ov-freeze (weights and scales) from step 5; resumed from
    step 2 (before both switches), 4 (between) and 6 (after both), each ends bit-identical."""
    args = ("quant.learnable=true", "quant.start_step=3", "freeze.start_step=5", "train.max_steps=8",
            "checkpoint.every=2", "checkpoint.keep=4")
    full = run(tmp_path / "full", *args)
    ref_w, ref_loss = weights(full), losses(full)
    for k in (2, 4, 6):
        cut = tmp_path / f"cut{k}"
        shutil.copytree(full, cut)
        shutil.rmtree(cut / "final")
        (cut / "eval.json").unlink()
        for later in range(k + 2, 9, 2):
            shutil.rmtree(cut / "checkpoints" / f"step-{later}")
        run(cut, *args, "checkpoint.resume=auto")
        w = weights(cut)
        assert w.keys() == ref_w.keys() and all(torch.equal(w[n], ref_w[n]) for n in w), f"resumed at step {k}"
        assert losses(cut) == ref_loss, f"resumed at step {k}"


@needs_fixtures
def test_init_from_block_ap_starts_at_its_model_and_its_trained_latent_weights(tmp_path):
    """Block-AP (EfficientQAT's first phase, `qat ptq --method block-ap`) then QAT: the block-trained
    latent weights are saved off the grid, and train.max_steps=0 from the run is its model exactly."""
    ptq = tmp_path / "block-ap"
    assert main(["ptq", TINY, "--method", "block-ap", f"output_dir={ptq}", *FAST[:3], "train.max_steps=4", "data.valid_files=null"]) == 0
    ref = weights(ptq)
    latent = load_file(str(ptq / "final" / "qat" / "latent.safetensors"))
    details = json.loads((ptq / "eval.json").read_text())["details"]
    assert len(latent) == 28 and all(not torch.equal(latent[n].to(ref[n].dtype), ref[n]) for n in latent)
    assert len(details) == 4 and all(b["steps"] == 2 * 2 and b["mse_last_epoch"] < b["mse_first_epoch"] for b in details.values())
    out = run(tmp_path / "init", "train.max_steps=0", f"quant.init_from={ptq}", "quant.learnable=true", "freeze.policy=none")
    got = weights(out)
    assert all(torch.equal(got[n], ref[n]) for n in latent)


@needs_fixtures
def test_init_from_gptq_starts_at_the_gptq_model(tmp_path):
    """train.max_steps=0 from a GPTQ run is that GPTQ model: its on-grid weights and scales, with
    dynamic (ov-frozen layers included) and with learnable qparams."""
    ptq = tmp_path / "gptq"
    assert main(["ptq", TINY, "--method", "gptq", f"output_dir={ptq}", *FAST[:3], "train.max_steps=4", "data.valid_files=null"]) == 0
    ref = weights(ptq)
    ref_qp = load_file(str(ptq / "final" / "qat" / "qparams.safetensors"))
    rtn = weights(run(tmp_path / "rtn", "train.max_steps=0"))
    for extra in ([], ["quant.learnable=true", "freeze.policy=none"]):
        out = run(tmp_path / f"init{len(extra)}", "train.max_steps=0", f"quant.init_from={ptq}", *extra)
        got, qp = weights(out), load_file(str(out / "final" / "qat" / "qparams.safetensors"))
        layers = json.loads((out / "final" / "qat_quant.json").read_text())["layers"]
        for n in layers:  # learnable: the same scale tensor; dynamic: min-max x clip ratio gives it within an ulp
            if extra:
                assert torch.equal(got[f"{n}.weight"], ref[f"{n}.weight"]), n
            else:  # same codes: one code step would be ~1e-2
                torch.testing.assert_close(got[f"{n}.weight"], ref[f"{n}.weight"], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(qp[f"{n}.weight_scale"], ref_qp[f"{n}.weight_scale"], rtol=1e-6, atol=0)
        assert any(not torch.equal(got[f"{n}.weight"], rtn[f"{n}.weight"]) for n in layers)
    # the latent start: GPTQ's pre-rounding weights, which round to its codes but sit inside their bins
    from transformers import AutoModelForCausalLM

    from conftest import require_tiny

    from qat.policy.init_from import load_quantized_start
    from qat.quant.grid import group_view, quantize

    latent = load_file(str(ptq / "final" / "qat" / "latent.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(require_tiny(), dtype=torch.float32)
    quantize_model(model, QuantScheme(bits=4, group_size=64))
    assert "latent weights from qat/latent.safetensors" in load_quantized_start(model, ptq)
    dist, kept = [], []
    for n in layers:
        w = model.get_submodule(n).weight.detach()
        s, z = ref_qp[f"{n}.weight_scale"].float(), ref_qp[f"{n}.weight_zero_point"].float()
        # the stored model's codes exactly (on the stored bf16 scales), from the pre-rounding weights
        # wherever those round the same on them, else from the on-grid weight
        assert torch.equal(quantize(w, s, z, 4, True, 64), quantize(ref[f"{n}.weight"].float(), s, z, 4, True, 64)), n
        kept.append((w == latent[f"{n}.weight"]).float().mean())
        v = group_view(w, 64) / s.unsqueeze(-1)
        dist.append((0.5 - (v - v.round()).abs()).mean())
    assert torch.stack(kept).mean() > 0.95
    assert 0.2 < torch.stack(dist).mean() < 0.3  # ~0.25 of a step from a flip, like any weight; 0.5 on the grid
    # a run at another bit width is refused, naming the key
    assert main(["train", TINY, f"output_dir={tmp_path}/w3", *FAST, "train.max_steps=0", "quant.bits=3", f"quant.init_from={ptq}"]) == 2
    assert not (tmp_path / "w3").exists()


@needs_fixtures
def test_seq_grid_end_to_end_ptq_init_from_train_and_export(tmp_path, capsys):
    """quant.grid: seq through every path: a GPTQ run on it, QAT starting from that run (step 0 is the
    GPTQ model, learnable and dynamic), a few QAT steps with the loss falling and the trained layers
    on the grid, and export: fake round-trips, the integer zero-point formats refuse with the reason."""
    seq = ["quant.bits=2", "quant.grid=seq", "quant.group_size=64", "quant.symmetric=null"]  # the tiny recipe says true
    ptq = tmp_path / "gptq"
    assert main(["ptq", TINY, "--method", "gptq", f"output_dir={ptq}", *FAST[:3], *seq, "train.max_steps=4", "data.valid_files=null"]) == 0
    layers = json.loads((ptq / "final" / "qat_quant.json").read_text())["layers"]
    ref, ref_qp = weights(ptq), load_file(str(ptq / "final" / "qat" / "qparams.safetensors"))
    assert len(layers) == 28 and all(i["grid"] == "seq" and not i["symmetric"] for i in layers.values())
    assert all(torch.equal(z, torch.full_like(z, 1.5)) for k, z in ref_qp.items() if k.endswith("zero_point"))
    for extra in (["quant.learnable=true"], ["quant.learnable=false"]):
        got = weights(run(tmp_path / f"init-{extra[0][-4:]}", *seq, *extra, "train.max_steps=0", f"quant.init_from={ptq}"))
        for n in layers:
            torch.testing.assert_close(got[f"{n}.weight"], ref[f"{n}.weight"], rtol=1e-6, atol=1e-7)
    assert main(["train", TINY, f"output_dir={tmp_path}/int", *FAST, "train.max_steps=0", "quant.bits=2", f"quant.init_from={ptq}"]) == 2
    assert "grid seq" in capsys.readouterr().err and not (tmp_path / "int").exists()

    out = run(tmp_path / "qat", *seq, "train.max_steps=6", "train.warmup_steps=1")
    loss = losses(out)
    assert loss[-1] < loss[0], loss
    w, qp = weights(out), load_file(str(out / "final" / "qat" / "qparams.safetensors"))
    for n in layers:
        s, z = qp[f"{n}.weight_scale"], qp[f"{n}.weight_zero_point"]
        steps = group_view(w[f"{n}.weight"].float(), 64) / s.float().unsqueeze(-1)  # final/ is bf16: 1.5 * s rounds
        assert torch.equal(z, torch.full_like(z, 1.5)) and (steps - (torch.round(steps * 2) / 2)).abs().max() < 1e-2, n
        assert set((torch.round(steps * 2) / 2).unique().tolist()) <= {-1.5, -0.5, 0.5, 1.5}, n
    # the packed formats hold SEQ's levels as the odd codes of a symmetric grid with half the scale:
    # int4 (what vLLM's WNA16 kernels take), int3 with --any-bits (packed densely), exactly
    for fmt, extra, bits in (("compressed-tensors", [], 4), ("compressed-tensors", ["--any-bits"], 3), ("gptq", [], 4)):
        dest = tmp_path / f"export-{fmt}-{bits}"
        assert main(["export", str(out), "--format", fmt, "--out", str(dest), "--verify", *extra]) == 0
        printed = capsys.readouterr().out
        assert "max abs difference 0 (identical)" in printed, printed
        qc = json.loads((dest / "config.json").read_text())["quantization_config"]
        assert (qc["config_groups"]["group_0"]["weights"]["num_bits"] if fmt == "compressed-tensors" else qc["bits"]) == bits
    assert main(["export", str(out), "--format", "fake", "--out", str(tmp_path / "fake")]) == 0
    assert json.loads((tmp_path / "fake" / "qat_quant.json").read_text())["layers"] == json.loads((out / "final" / "qat_quant.json").read_text())["layers"]
    fake = load_file(str(tmp_path / "fake" / "model.safetensors"))
    assert all(torch.equal(fake[f"{n}.weight"], w[f"{n}.weight"]) for n in layers)
