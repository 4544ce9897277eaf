"""quantize_model / dequantize_model / apply_freeze on real Hugging Face architectures (Llama, OPT)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qat.quant import (
    OV_PATTERNS,
    QATLinear,
    QuantConfigError,
    QuantScheme,
    apply_freeze,
    dequantize_model,
    qat_linears,
    quantize_model,
)

LLAMA_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
OPT_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")

W4 = QuantScheme(bits=4, group_size=32, symmetric=True)
W8 = QuantScheme(bits=8, group_size=None, symmetric=True)


def _llama_names(n_layers=2, prefix="model.layers"):
    return {f"{prefix}.{i}.{p}" for i in range(n_layers) for p in LLAMA_PROJ}


def _tokens(vocab: int, shape=(2, 12), seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


def _plain_linears(model):
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear}


# --------------------------------------------------------------------------------------------
# which layers get wrapped
# --------------------------------------------------------------------------------------------


def test_wraps_exactly_the_seven_block_linears(tiny_llama):
    report = quantize_model(tiny_llama, W4)
    expected = _llama_names()
    assert set(report.layers) == expected and len(report.layers) == 14
    assert set(qat_linears(tiny_llama)) == expected
    assert report.skipped == ["lm_head"]
    assert type(tiny_llama.lm_head) is nn.Linear
    assert all(s == W4 for s in report.layers.values())
    for name in expected:
        layer = tiny_llama.get_submodule(name)
        assert isinstance(layer, QATLinear) and layer.scheme == W4 and not layer.frozen
    summary = report.summary()
    assert "quantized 100.0% of block weights (14 Linear), left 1 in full precision" in summary
    assert "14 x W4 group 32 sym init=minmax" in summary and "lm_head" in summary


def test_wrapping_keeps_state_dict_keys_and_shares_weights(tiny_llama):
    keys_before = set(tiny_llama.state_dict())
    q_weight = tiny_llama.model.layers[0].self_attn.q_proj.weight
    quantize_model(tiny_llama, W4)
    assert tiny_llama.model.layers[0].self_attn.q_proj.weight is q_weight
    extra = set(tiny_llama.state_dict()) - keys_before
    assert extra == {f"{n}.clip_ratio" for n in _llama_names()}


def test_second_call_skips_already_wrapped_layers(tiny_llama):
    quantize_model(tiny_llama, W4)
    with pytest.raises(QuantConfigError, match="targets: pattern .* matches no Linear layer"):
        quantize_model(tiny_llama, W4)  # only lm_head is left, and it is not a target
    with pytest.raises(QuantConfigError, match="leave no Linear layer"):
        quantize_model(tiny_llama, W4, targets=[r"lm_head$"], ignore=[r"head"])
    report = quantize_model(tiny_llama, W8, targets=[r"lm_head$"])
    assert set(report.layers) == {"lm_head"}
    assert isinstance(tiny_llama.lm_head, QATLinear) and tiny_llama.lm_head.scheme == W8


def test_targets_matching_nothing_raise(tiny_llama):
    with pytest.raises(QuantConfigError, match=r"targets: pattern 'attn.*c_attn' matches no Linear layer"):
        quantize_model(tiny_llama, W4, targets=[r"attn\.c_attn"])
    with pytest.raises(QuantConfigError, match="ignore: pattern"):
        quantize_model(tiny_llama, W4, ignore=[r"nonexistent"])
    with pytest.raises(QuantConfigError, match="targets: invalid regex"):
        quantize_model(tiny_llama, W4, targets=["(unclosed"])
    with pytest.raises(QuantConfigError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()), W4)
    assert not qat_linears(tiny_llama)  # nothing was wrapped by the failed calls


def test_ignore_pattern(tiny_llama):
    report = quantize_model(tiny_llama, W4, ignore=[r"\.mlp\."])
    attn = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert set(report.layers) == attn
    assert set(report.skipped) == (_llama_names() - attn) | {"lm_head"}
    assert type(tiny_llama.model.layers[1].mlp.down_proj) is nn.Linear


def test_layer_schemes_mixed_precision(tiny_llama):
    fresh = copy.deepcopy(tiny_llama)
    down = QuantScheme(bits=8, group_size=64, symmetric=False)
    qkv = QuantScheme(bits=3, group_size=None, symmetric=False, scale_init="mse")
    report = quantize_model(tiny_llama, W4, layer_schemes=[(r"down_proj$", down), (r"\.[qkv]_proj$", qkv)])
    for name in _llama_names():
        expected = down if name.endswith("down_proj") else qkv if name[-6:] in ("q_proj", "k_proj", "v_proj") else W4
        assert report.layers[name] == expected, name
        assert tiny_llama.get_submodule(name).scheme == expected, name
    assert "2 x W8 group 64 asym" in report.summary()
    with pytest.raises(QuantConfigError, match="layer_schemes: pattern"):
        quantize_model(fresh, W4, layer_schemes=[(r"nothing_here", W8)])


def test_layer_schemes_invalid_regex_is_a_config_error(tiny_llama):
    with pytest.raises(QuantConfigError, match="layer_schemes: invalid regex"):
        quantize_model(tiny_llama, W4, layer_schemes=[("(unclosed", W8)])


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 96)
        self.b = nn.Linear(96, 64)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])


def test_group_size_not_dividing_names_the_layer_and_changes_nothing():
    net = _Net()
    with pytest.raises(QuantConfigError, match=r"layer 'layers\.0\.b': group_size 64 does not divide in_features 96"):
        quantize_model(net, QuantScheme(bits=4, group_size=64))
    assert not qat_linears(net), "a failed quantize_model must leave the model untouched"
    # per-layer override to a dividing group size fixes it
    report = quantize_model(net, QuantScheme(bits=4, group_size=64), layer_schemes=[(r"\.b$", W4)])
    assert report.layers["layers.1.b"].group_size == 32


def test_non_finite_weight_names_the_layer(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has 1 non-finite"):
        quantize_model(tiny_llama, W4)


# --------------------------------------------------------------------------------------------
# wrapped model == plain model with on-grid weights
# --------------------------------------------------------------------------------------------

SCHEMES = [
    W4,
    QuantScheme(bits=4, group_size=16, symmetric=False, scale_init="mse"),
    QuantScheme(bits=3, group_size=None, symmetric=False, learnable=True),
    QuantScheme(bits=8, group_size=64, symmetric=True, act_bits=8),
]


def _check_logits_equal_plain_on_grid(model, scheme, ids, n_layers):
    plain = copy.deepcopy(model)
    fp_logits = _logits(model, ids)
    report = quantize_model(model, scheme)
    assert len(report.layers) == 7 * n_layers
    logits = _logits(model, ids)
    assert not torch.equal(logits, fp_logits)  # quantization changed something

    # (a) a plain copy whose Linear weights were replaced by the on-grid weights by hand
    for name, layer in qat_linears(model).items():
        target = plain.get_submodule(name)
        assert type(target) is nn.Linear
        with torch.no_grad():
            target.weight.copy_(layer.on_grid_weight())
    if scheme.act_bits is None:
        assert torch.equal(_logits(plain, ids), logits)

    # (b) dequantize_model on a copy of the wrapped model
    deq = copy.deepcopy(model)
    layers = dequantize_model(deq)
    assert set(layers) == set(report.layers) and not qat_linears(deq)
    for name, info in layers.items():
        scale, zero = info["_qparams"]
        qw = model.get_submodule(name).quantized_weight()
        assert torch.equal(scale, qw.scale) and torch.equal(zero, qw.zero_point)
        assert info["bits"] == scheme.bits and info["group_size"] == scheme.group_size
        assert info["symmetric"] == scheme.symmetric and info["frozen"] is False
        w = deq.get_submodule(name).weight
        assert type(deq.get_submodule(name)) is nn.Linear and not w.requires_grad
        assert torch.equal(w, plain.get_submodule(name).weight)
    if scheme.act_bits is None:
        assert torch.equal(_logits(deq, ids), logits)
    else:
        # activation fake-quant is a runtime op that a plain model does not do
        assert torch.allclose(_logits(deq, ids), logits, rtol=0, atol=5e-2)
    return model


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"w{s.bits}g{s.group_size}{'s' if s.symmetric else 'a'}")
def test_wrapped_logits_equal_plain_model_with_on_grid_weights(tiny_llama, scheme):
    _check_logits_equal_plain_on_grid(tiny_llama, scheme, _tokens(256), n_layers=2)


def test_wrapped_logits_equal_plain_on_grid_pretrained(llama_tiny_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_tiny_path, dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    ids = _tokens(model.config.vocab_size, (2, 16))
    _check_logits_equal_plain_on_grid(model, QuantScheme(bits=4, group_size=128), ids, n_layers)


def test_dequantize_model_bf16_scales(tiny_llama):
    quantize_model(tiny_llama, QuantScheme(bits=4, group_size=32, symmetric=False))
    wrapped = qat_linears(tiny_llama)
    expected = {n: m.quantized_weight(torch.bfloat16).dequantize(torch.bfloat16) for n, m in wrapped.items()}
    layers = dequantize_model(tiny_llama, torch.bfloat16)
    for name, w in expected.items():
        layer = tiny_llama.get_submodule(name)
        assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, w)
        assert layers[name]["_qparams"][0].dtype == layers[name]["_qparams"][1].dtype == torch.bfloat16


def test_dequantize_model_after_freeze_reports_frozen(tiny_llama):
    quantize_model(tiny_llama, W4)
    apply_freeze(tiny_llama, "ov-freeze")
    grid = {n: m.on_grid_weight() for n, m in qat_linears(tiny_llama).items()}
    layers = dequantize_model(tiny_llama)
    for name, info in layers.items():
        assert info["frozen"] == name.endswith(("v_proj", "o_proj"))
        assert torch.equal(tiny_llama.get_submodule(name).weight, grid[name])


# --------------------------------------------------------------------------------------------
# OPT naming
# --------------------------------------------------------------------------------------------


def test_opt_default_targets_and_ov_freeze_patterns(tiny_opt):
    ids = _tokens(256)
    report = quantize_model(tiny_opt, W4)
    expected = {f"model.decoder.layers.{i}.{p}" for i in range(2) for p in OPT_PROJ}
    assert set(report.layers) == expected and report.skipped == ["lm_head"]
    with torch.no_grad():
        logits = _logits(tiny_opt, ids)
    deq = copy.deepcopy(tiny_opt)
    dequantize_model(deq)
    assert torch.equal(_logits(deq, ids), logits)

    # Llama's default ov-freeze patterns do not fit OPT ...
    with pytest.raises(QuantConfigError, match=r"freeze policy 'ov-freeze': pattern '.*o_proj.*' matches no Linear layer"):
        apply_freeze(tiny_opt, "ov-freeze")
    assert not any(m.frozen for m in qat_linears(tiny_opt).values())
    # ... OPT's do
    frozen = apply_freeze(tiny_opt, "ov-freeze", [r"\.v_proj$", r"\.out_proj$"])
    assert set(frozen) == {f"model.decoder.layers.{i}.self_attn.{p}" for i in range(2) for p in ("v_proj", "out_proj")}
    for name, layer in qat_linears(tiny_opt).items():
        assert layer.frozen == (name in frozen)
    assert torch.equal(_logits(tiny_opt, ids), logits)  # freezing does not change the output


# --------------------------------------------------------------------------------------------
# freeze policies during training
# --------------------------------------------------------------------------------------------


def _train(model, steps=3, vocab=256, lr=5e-3):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    for step in range(steps):
        ids = _tokens(vocab, (4, 16), seed=100 + step)
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("learnable", [False, True])
def test_ov_freeze_keeps_v_and_o_bit_identical_while_the_rest_trains(tiny_llama, learnable):
    quantize_model(tiny_llama, QuantScheme(bits=4, group_size=32, symmetric=False, learnable=learnable))
    frozen = apply_freeze(tiny_llama, "ov-freeze")
    assert OV_PATTERNS == (r"\.v_proj$", r"\.o_proj$")
    assert set(frozen) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("v_proj", "o_proj")}
    layers = qat_linears(tiny_llama)
    before = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in layers.items()}
    codes_before = {n: layers[n].quantized_weight().codes for n in frozen}

    _train(tiny_llama)

    for name, layer in layers.items():
        after = layer.state_dict()
        if name in frozen:
            assert layer.frozen and set(after) == {"weight", "weight_scale", "weight_zero_point"}
            for k, v in after.items():
                assert torch.equal(v, before[name][k]), f"{name}.{k} moved"
            assert layer.weight.grad is None
            assert torch.equal(layer.quantized_weight().codes, codes_before[name])
        else:
            assert not layer.frozen
            assert not torch.equal(after["weight"], before[name]["weight"]), f"{name} did not train"
            if learnable:
                assert not torch.equal(after["weight_scale"], before[name]["weight_scale"]), name


def test_freeze_policy_errors_and_custom(tiny_llama, tiny_opt):
    quantize_model(tiny_llama, W4)
    with pytest.raises(QuantConfigError, match="freeze policy must be one of"):
        apply_freeze(tiny_llama, "ov_freeze")
    with pytest.raises(QuantConfigError, match="needs a non-empty list of patterns"):
        apply_freeze(tiny_llama, "custom")
    with pytest.raises(QuantConfigError, match="policy 'none'"):
        apply_freeze(tiny_llama, "none", [r"\.v_proj$"])
    with pytest.raises(QuantConfigError, match=r"freeze policy 'custom': pattern 'nothing' matches no Linear"):
        apply_freeze(tiny_llama, "custom", [r"\.k_proj$", "nothing"])
    with pytest.raises(QuantConfigError, match="freeze policy 'custom': invalid regex"):
        apply_freeze(tiny_llama, "custom", ["(unclosed"])
    assert apply_freeze(tiny_llama, "none") == []
    assert not any(m.frozen for m in qat_linears(tiny_llama).values())

    # custom: a quantized layer is snapped to its grid, a plain Linear just stops training
    frozen = apply_freeze(tiny_llama, "custom", [r"layers\.1\.mlp\.down_proj$", r"^lm_head$"])
    assert frozen == ["model.layers.1.mlp.down_proj", "lm_head"]
    assert tiny_llama.model.layers[1].mlp.down_proj.frozen
    assert not tiny_llama.model.layers[0].mlp.down_proj.frozen
    assert not tiny_llama.lm_head.weight.requires_grad
    head = tiny_llama.lm_head.weight.detach().clone()
    down = tiny_llama.model.layers[1].mlp.down_proj.weight.detach().clone()
    _train(tiny_llama, steps=2)
    assert torch.equal(tiny_llama.lm_head.weight, head)
    assert torch.equal(tiny_llama.model.layers[1].mlp.down_proj.weight, down)

    # ov-freeze on a model without o_proj (OPT, default patterns)
    quantize_model(tiny_opt, W4)
    with pytest.raises(QuantConfigError, match="ov-freeze"):
        apply_freeze(tiny_opt, "ov-freeze")


def test_freezing_a_plain_linear_after_backward_drops_its_gradient(tiny_llama):
    _train(tiny_llama, steps=1)
    tiny_llama.zero_grad(set_to_none=False)  # zero tensors, not None
    apply_freeze(tiny_llama, "custom", [r"^lm_head$"])
    assert tiny_llama.lm_head.weight.grad is None
