"""PTQ baselines: GPTQ against a slow reference, GPTQ < RTN on real activations, QERA orderings,
every method on the llama-tiny fixture (on-grid weights), QERA's adapter round trip."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import require_tiny  # noqa: E402
from torch import nn

from qat.quant.grid import fake_quantize, minmax_qparams, quantize
from qat.quant.linear import QATLinear
from qat.quant.scheme import QuantScheme

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes/tiny/w4-ovfreeze.yaml"
LLAMA_TINY = REPO.parent / "shared" / "models" / "llama-tiny"


# -- GPTQ against a plain reference ----------------------------------------------------------
def gptq_reference(w: torch.Tensor, h: torch.Tensor, scheme: QuantScheme, damp: float, act_order: bool) -> torch.Tensor:
    """GPTQ as the paper states it, one column at a time with the explicit inverse Hessian (OBS
    update with a fixed order, then Gaussian elimination of the quantized column), float64.
    Dynamic groups: qparams from the group's current (updated) columns when reaching its first
    column. With act_order: static groups from the original weight."""
    w, h = w.clone().double(), h.clone().double()
    n = w.shape[1]
    g = scheme.group_size or n
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    static = None
    if act_order:
        static = minmax_qparams(w, scheme.bits, g, scheme.symmetric)
        perm = torch.argsort(torch.diagonal(h), descending=True)
    else:
        perm = torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h = h + damp * torch.diagonal(h).mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    q_all = torch.zeros_like(w)
    scale = zero = None
    for i in range(n):
        if static is not None:
            grp = int(perm[i]) // g
            scale, zero = static[0][:, grp : grp + 1], static[1][:, grp : grp + 1]
        elif i % g == 0:
            scale, zero = minmax_qparams(w[:, i : i + g], scheme.bits, None, scheme.symmetric)
        q = fake_quantize(w[:, i : i + 1], scale, zero, scheme.bits, scheme.symmetric, None)[:, 0]
        q_all[:, i] = q
        err = (w[:, i] - q) / hinv[i, i]
        w[:, i:] -= err.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return q_all[:, torch.argsort(perm)]


def correlated_inputs(n: int, d: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    """Rows with correlated channels and very different channel scales (LLM-like outliers)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 + torch.eye(d, dtype=torch.float64)
    scales = torch.exp(spread * torch.rand(d, generator=g, dtype=torch.float64))
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix) * scales


@pytest.mark.parametrize(
    "group,block,act_order",
    [(32, 128, False), (32, 16, False), (32, 48, False), (None, 32, False), (32, 16, True)],
)
def test_gptq_matches_slow_reference(group, block, act_order):
    from qat.ptq.gptq import gptq_quantize

    scheme = QuantScheme(bits=3, group_size=group, symmetric=group is not None)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 128, generator=g, dtype=torch.float64)
    x = correlated_inputs(512, 128, seed=2)
    h = 2 * x.T @ x / x.shape[0]
    h[5, :] = 0
    h[:, 5] = 0  # a dead input channel
    q, scale, zero, info = gptq_quantize(w, h, scheme, damp=0.01, block_size=block, act_order=act_order)
    ref = gptq_reference(w, h, scheme, 0.01, act_order)
    assert info["damp"] == 0.01
    # float64 both: the same grid points (up to float rounding of the scales), bar a rare tie
    differ = (q - ref).abs() > 1e-9
    assert differ.double().mean() < 0.005, differ.double().mean()
    # the result is on the returned qparams' grid, groups contiguous
    assert torch.equal(fake_quantize(q, scale, zero, 3, scheme.symmetric, group), q)
    assert torch.all(q[:, 5] == 0)
    # the pre-rounding (error-compensated) weights round to exactly these codes, and lie off the grid points
    q2, _, _, _, latent = gptq_quantize(w, h, scheme, damp=0.01, block_size=block, act_order=act_order, latent=True)
    assert torch.equal(q2, q)
    assert torch.equal(fake_quantize(latent, scale, zero, 3, scheme.symmetric, group), q)
    live = torch.ones(128, dtype=torch.bool)
    live[5] = False
    assert (latent[:, live] - q[:, live]).abs().mean() > 0.1 * scale.mean()


# -- local errors on real activations of the fixture ----------------------------------------
@pytest.fixture(scope="module")
def tiny(llama_tiny_path_module):
    """llama-tiny (fp32), its quant plan, calibration and held-out blocks from the books data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat.data import build_datasets
    from qat.data.plans import calibration_blocks
    from qat.policy import quant_plan
    from qat.recipe import load_recipe

    recipe = load_recipe(TINY, ["data.max_train_tokens=8192", "data.max_valid_tokens=1024"], check_files=False)
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"path": str(llama_tiny_path_module)})})
    for key in ("files", "valid_files"):
        setattr(recipe.data, key, [str(REPO / f) for f in getattr(recipe.data, key)])
    tok = AutoTokenizer.from_pretrained(str(llama_tiny_path_module))
    model = AutoModelForCausalLM.from_pretrained(str(llama_tiny_path_module), dtype=torch.float32).eval()
    train, valid = build_datasets(recipe.data, tok)
    return {
        "recipe": recipe,
        "model": model,
        "plan": quant_plan(recipe, model.config),
        "calib": calibration_blocks(train, 1024, 0),  # 8 sequences of 128
        "calib_large": calibration_blocks(train, 8192, 0),  # 64 sequences
        "valid": valid,
    }


@pytest.fixture(scope="module")
def llama_tiny_path_module():
    require_tiny()
    return LLAMA_TINY


def layer_inputs(model, name: str, blocks) -> torch.Tensor:
    xs = []
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=blocks.input_ids)
    h.remove()
    return torch.cat(xs).double()


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_output_error_below_rtn_on_real_activations(tiny, bits):
    from qat.ptq.gptq import gptq_quantize
    from qat.ptq.rtn import rtn_weight

    scheme = QuantScheme(bits=bits, group_size=64)
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.2.mlp.down_proj"):
        w = tiny["model"].get_submodule(name).weight.detach().float()
        x_cal = layer_inputs(tiny["model"], name, tiny["calib_large"])
        x_val = layer_inputs(tiny["model"], name, tiny["valid"])
        h = (2 * x_cal.T @ x_cal / x_cal.shape[0]).float()
        q_gptq = gptq_quantize(w, h, scheme)[0]
        q_rtn = rtn_weight(w, scheme)[0]

        def rel(q, x):
            return float((x @ (q.double() - w.double()).T).norm() / (x @ w.double().T).norm())

        assert rel(q_gptq, x_cal) < 0.9 * rel(q_rtn, x_cal), name
        # also on held-out text, given enough calibration tokens (8192 for 128..384 inputs)
        assert rel(q_gptq, x_val) < rel(q_rtn, x_val), name


# -- QERA ----------------------------------------------------------------------------------
def test_qera_orderings_on_correlated_inputs():
    from qat.ptq.rtn import rtn_weight
    from qat.quant.lowrank import lowrank_factors

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g, dtype=torch.float64).float()
    x = correlated_inputs(8192, 96, seed=3)
    x_cal, x_val = x[:4096], x[4096:]  # fit on one half, check on the other
    q = rtn_weight(w, QuantScheme(bits=3, group_size=32))[0]
    e = w.double() - q.double()
    r = x_cal.T @ x_cal / x_cal.shape[0]

    def out_err(a, b, x):
        return float((x @ (e - b @ a).T).norm() / (x @ w.double().T).norm())

    exact = lowrank_factors(e, 8, r=r)[:2]
    approx = lowrank_factors(e, 8, diag=torch.diagonal(r))[:2]
    svd = lowrank_factors(e, 8)[:2]
    base = float((x_cal @ e.T).norm() / (x_cal @ w.double().T).norm())
    for xs in (x_cal, x_val):
        errs = [out_err(*f, xs) for f in (exact, approx, svd)]
        assert errs[0] <= errs[1] <= errs[2] < base, errs
        assert errs[0] < 0.9 * errs[2], errs
    # the exact solution is a minimum on its calibration inputs: nudging the factors only hurts
    a, b = exact
    best = out_err(a, b, x_cal)
    for _ in range(5):
        assert out_err(a + 1e-3 * torch.randn(a.shape, generator=g, dtype=torch.float64), b, x_cal) >= best - 1e-12
        assert out_err(a, b + 1e-3 * torch.randn(b.shape, generator=g, dtype=torch.float64), x_cal) >= best - 1e-12


def test_qera_exact_regularises_singular_r():
    from qat.quant.lowrank import lowrank_factors

    g = torch.Generator().manual_seed(0)
    e = torch.randn(16, 64, generator=g, dtype=torch.float64) * 0.01
    x = correlated_inputs(32, 64, seed=5)  # 32 tokens < 64 channels: R has rank 32
    x[:, 7] = 0  # and a dead channel
    r = x.T @ x / x.shape[0]
    a, b, info = lowrank_factors(e, 4, r=r)
    assert info["regularised"] and torch.isfinite(a).all() and torch.isfinite(b).all()
    a_svd, b_svd, _ = lowrank_factors(e, 4)
    assert (x @ (e - b @ a).T).norm() < (x @ (e - b_svd @ a_svd).T).norm()


# -- every method on the fixture ------------------------------------------------------------
FAST_OPTS = ["ptq.awq.grid=4", "ptq.awq.search_tokens=256", "ptq.awq.clip_grid=5", "ptq.qera.rank=8", "ptq.batch_size=8"]


def _opts(extra=()):
    from qat.recipe import load_recipe

    return load_recipe(TINY, FAST_OPTS + list(extra), check_files=False).ptq


def _assert_on_grid(model, plan):
    for name, scheme in plan.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QATLinear) and layer.fixed, name
        s, z = layer.weight_scale, layer.weight_zero_point
        codes = quantize(layer.weight.detach(), s, z, scheme.bits, scheme.symmetric, scheme.group_size)
        deq = (codes.reshape(s.shape[0], s.shape[1], -1).float() - z.unsqueeze(-1)) * s.unsqueeze(-1)
        assert torch.equal(deq.reshape(layer.weight.shape), layer.weight.detach()), name


def _mean_rel_error(fp_model, variant_weights, blocks):
    from qat.evaluate.diagnostic import layer_output_errors, mean_error

    return mean_error(layer_output_errors(fp_model, {"v": variant_weights}, blocks, desc=None)["v"])


@pytest.fixture(scope="module")
def rtn_error(tiny):
    from qat.ptq import quantize_ptq

    model = copy.deepcopy(tiny["model"])
    quantize_ptq(model, tiny["plan"], "rtn", None, _opts(), "cpu", "cpu")
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in tiny["plan"]}
    return _mean_rel_error(tiny["model"], weights, tiny["valid"])


@pytest.mark.parametrize("method", ["rtn", "rtn-mse", "gptq", "awq", "qera-exact", "qera-approx", "block-ap"])
def test_method_runs_on_grid_and_beats_or_matches_rtn(tiny, rtn_error, method, tmp_path):
    from qat.io.final import SCALES_FILE, effective_weights, save_final
    from qat.ptq import quantize_ptq
    from qat.ptq.run import save_adapter

    extra = {"gptq": ["ptq.gptq.act_order=true"], "block-ap": ["ptq.block_ap.weight_lr=1e-4", "ptq.block_ap.epochs=8"]}.get(method, [])
    model = copy.deepcopy(tiny["model"])
    lora, info, folds = quantize_ptq(model, tiny["plan"], method, tiny["calib"], _opts(extra), "cpu", "cpu")
    _assert_on_grid(model, tiny["plan"])
    if method == "block-ap":  # every block trained: its output error fell, and the latent weights round to the codes
        assert len(info) == 4 and all(b["mse_last_epoch"] < 0.98 * b["mse_first_epoch"] for b in info.values()), info
        for name, scheme in tiny["plan"].items():
            layer = model.get_submodule(name)
            args = (layer.weight_scale, layer.weight_zero_point, scheme.bits, scheme.symmetric, scheme.group_size)
            assert torch.equal(quantize(layer.ptq_latent, *args), quantize(layer.weight.detach(), *args)), name
            moved = (layer.ptq_latent - tiny["model"].get_submodule(name).weight.detach()).abs()  # the weights trained, not only the scales
            assert moved.mean() > 1e-4 and (moved > 0).float().mean() > 0.9, name
    assert bool(lora) == method.startswith("qera")
    assert bool(folds) == (method == "awq")
    if method.startswith("qera"):
        assert all(a.shape == (8, model.get_submodule(n).in_features) for n, (a, b) in lora.items())
    # final/ (and the adapter, the AWQ scales) -> effective weights -> local error vs RTN
    ids = tiny["valid"].input_ids[:2]
    with torch.no_grad():
        logits_mem = model(input_ids=ids).logits
    save_final(model, None, tmp_path / "final", torch.float32)
    if lora:
        model = save_adapter(model, lora, tmp_path / "final" / "adapter")
    if folds:
        from safetensors.torch import save_file

        save_file({f"{n}.{k}": t.clone() for n, d in folds.items() for k, t in d.items()}, str(tmp_path / "final" / SCALES_FILE))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits_mem, atol=2e-4, rtol=1e-4)
    err = _mean_rel_error(tiny["model"], effective_weights(tmp_path / "final"), tiny["valid"])
    if method == "rtn":
        assert err == pytest.approx(rtn_error, rel=1e-6)
    else:
        assert err < 1.02 * rtn_error, (method, err, rtn_error)
    if method in ("gptq", "qera-exact", "qera-approx"):
        assert err < 0.95 * rtn_error, (method, err, rtn_error)


@pytest.mark.parametrize("method", ["rtn-mse", "gptq", "awq", "block-ap"])
def test_methods_on_the_seq_grid(tiny, method):
    """Every PTQ method quantizes onto SEQ's grid (W2g64: zero-point 1.5 everywhere, codes 0..3)
    and beats plain RTN on it (min-max SEQ scales) in the layers' output error."""
    from dataclasses import replace

    from qat.ptq import quantize_ptq

    plan = {n: replace(s, bits=2, symmetric=False, grid="seq", learnable=False) for n, s in tiny["plan"].items()}
    extra = {"block-ap": ["ptq.block_ap.weight_lr=1e-4", "ptq.block_ap.epochs=4"]}.get(method, [])
    errors = {}
    for m in ("rtn", method):
        model = copy.deepcopy(tiny["model"])
        quantize_ptq(model, plan, m, tiny["calib"], _opts(extra), "cpu", "cpu")
        _assert_on_grid(model, plan)
        for name in plan:
            z = model.get_submodule(name).weight_zero_point
            assert torch.equal(z, torch.full_like(z, 1.5)), (m, name)
        errors[m] = _mean_rel_error(tiny["model"], {n: model.get_submodule(n).weight.detach() for n in plan}, tiny["valid"])
    # GPTQ gains little over RTN at 2 bits on 8 calibration sequences, on the integer grid too (0.367
    # vs 0.379); Block-AP minimises the block's output error, not each layer's
    assert errors[method] < {"gptq": 0.99, "block-ap": 0.99}.get(method, 0.9) * errors["rtn"], errors


def test_qera_adapter_reloads_with_peft(tiny, tmp_path):
    """``PeftModel.from_pretrained(base, final/adapter)`` reproduces the corrected model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qat.io.final import save_final
    from qat.ptq import quantize_ptq
    from qat.ptq.run import save_adapter

    model = copy.deepcopy(tiny["model"])
    lora, _, _ = quantize_ptq(model, tiny["plan"], "qera-exact", tiny["calib"], _opts(), "cpu", "cpu")
    ids = tiny["valid"].input_ids[:2]
    with torch.no_grad():
        corrected = model(input_ids=ids).logits
        save_final(model, None, tmp_path / "final", torch.float32)
        base_only = model(input_ids=ids).logits
        save_adapter(model, lora, tmp_path / "final" / "adapter")
        base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"), dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, str(tmp_path / "final" / "adapter")).eval()(input_ids=ids).logits
    torch.testing.assert_close(reloaded, corrected, atol=2e-4, rtol=1e-4)
    assert (base_only - corrected).abs().max() > 1e-2  # the correction does something


def test_calibration_budget_is_the_qat_budget():
    from qat.data.plans import calibration_budget
    from qat.recipe import load_recipe

    r = load_recipe(TINY, ["train.max_steps=30", "train.micro_batch_size=8", "train.grad_accum=2"], check_files=False)
    assert calibration_budget(r, 10**9)[0] == 30 * 8 * 2 * 128
    assert calibration_budget(r, 5000)[0] == 5000  # capped by the data
    r = load_recipe(TINY, ["ptq.calib_tokens=640"], check_files=False)
    assert calibration_budget(r, 10**9) == (640, "ptq.calib_tokens")
    r = load_recipe(TINY, ["train.max_steps=null", "train.epochs=0.5"], check_files=False)
    assert calibration_budget(r, 10000)[0] == 5000
    assert calibration_budget(r, 10000, processes=8)[0] == 5000  # an epoch is global already


def test_calibration_budget_is_global_over_the_qat_processes():
    """At 8 processes the QAT run trains on 8 x the tokens of one: the baselines get as many."""
    from qat.compare import qat_tokens
    from qat.data.plans import calibration_budget
    from qat.recipe import load_recipe

    r = load_recipe(TINY, ["train.max_steps=30", "train.micro_batch_size=8", "train.grad_accum=2"], check_files=False)
    tokens, why = calibration_budget(r, 10**9, processes=8)
    assert tokens == 30 * 8 * 2 * 128 * 8 and "x 8 processes" in why
    assert qat_tokens(r, {"steps": 30, "processes": 8, "train_tokens": tokens}) == tokens
    assert qat_tokens(r, {"steps": 30}) == 30 * 8 * 2 * 128  # a run from before the count was recorded: one process


def test_awq_scale_groups_and_fold_check(tiny):
    from qat.ptq.awq import scale_groups

    block = tiny["model"].model.layers[0]
    names = [n for n in tiny["plan"] if n.startswith("model.layers.0.")]
    groups = scale_groups(block, "model.layers.0", names)
    assert [g.prev.rsplit(".", 1)[-1] for g in groups] == ["input_layernorm", "v_proj", "post_attention_layernorm", "up_proj"]
    # a norm computing (1 + w) * x cannot absorb the scale: no group for it
    class OnePlusNorm(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.weight = nn.Parameter(w.clone())

        def forward(self, x):
            return x * (1 + self.weight)

    odd = copy.deepcopy(block)
    odd.input_layernorm = OnePlusNorm(block.input_layernorm.weight.detach())
    groups = scale_groups(odd, "model.layers.0", names)
    assert "model.layers.0.input_layernorm" not in [g.prev for g in groups]


@pytest.mark.parametrize("method", ["gptq", "awq", "qera-exact"])
def test_methods_on_an_opt_model(tiny_opt, method):
    """Another block layout (``model.decoder.layers``, LayerNorm with bias, ReLU MLP, ``out_proj``)."""
    from qat.data import TokenBlocks
    from qat.ptq import quantize_ptq
    from qat.ptq.awq import scale_groups
    from qat.quant import quantize_model

    plan = dict(quantize_model(copy.deepcopy(tiny_opt), QuantScheme(4, 32)).layers)
    g = torch.Generator().manual_seed(0)
    calib = TokenBlocks(torch.randint(0, 256, (8, 64), generator=g))
    model = copy.deepcopy(tiny_opt)
    if method == "awq":
        names = [n for n in plan if n.startswith("model.decoder.layers.0.")]
        prevs = [sg.prev.rsplit(".", 1)[-1] for sg in scale_groups(model.model.decoder.layers[0], "model.decoder.layers.0", names)]
        assert prevs == ["self_attn_layer_norm", "v_proj", "final_layer_norm", "fc1"]
    lora, _, folds = quantize_ptq(model, plan, method, calib, _opts(), "cpu", "cpu")
    _assert_on_grid(model, plan)
    ids = torch.randint(0, 256, (2, 64), generator=g)
    with torch.no_grad():
        ref, out = tiny_opt(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 0.5 * ref.abs().max()
    assert bool(folds) == (method == "awq") and bool(lora) == (method == "qera-exact")


def test_linear_groups_by_shared_input_after_partial_quantization(tiny):
    """Layers are grouped by the identity of the tensor they receive (q/k/v and gate/up share
    one), also once earlier layers are quantized with LoRA hooks (freed inputs reused memory
    and merged o_proj into the gate/up group when groups were keyed by data pointer)."""
    from qat.ptq.calibrate import BlockRunner, attach_lowrank, capture_inputs
    from qat.ptq.install import install_quantized
    from qat.ptq.rtn import rtn_qparams

    model = copy.deepcopy(tiny["model"])
    inputs = capture_inputs(model, tiny["calib"], 4, "cpu", "cpu")
    runner = BlockRunner(model, model.model.layers[0], "model.layers.0", inputs, "cpu", "cpu")
    names = [n for n in tiny["plan"] if n.startswith("model.layers.0.")]
    expected = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    short = lambda groups: [[n.rsplit(".", 1)[-1] for n in g] for g in groups]  # noqa: E731
    assert short(runner.linear_groups(names)) == expected
    for n in names[:4]:  # q, k, v, o quantized, with a low-rank hook each
        layer = install_quantized(model, n, tiny["plan"][n], *rtn_qparams(model.get_submodule(n).weight, tiny["plan"][n]))
        attach_lowrank(layer, torch.zeros(2, layer.in_features), torch.zeros(layer.out_features, 2))
    for _ in range(3):
        assert short(runner.linear_groups(names)) == expected
