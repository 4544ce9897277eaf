"""QATLinear (qat.quant.linear): forward == F.linear(x, on-grid weight), learnable qparams, export, freeze."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.grid import SCALE_FLOOR, group_view, minmax_qparams, mse_clip_ratio, quantize
from qat.quant.linear import QATLinear, QuantizedWeight
from qat.quant.scheme import QuantConfigError, QuantScheme

SCHEMES = {
    "w4g32sym": QuantScheme(bits=4, group_size=32, symmetric=True),
    "w4g16asym": QuantScheme(bits=4, group_size=16, symmetric=False),
    "w3chan_asym_mse": QuantScheme(bits=3, group_size=None, symmetric=False, scale_init="mse"),
    "w2g32sym_mse": QuantScheme(bits=2, group_size=32, symmetric=True, scale_init="mse"),
    "w8g64asym": QuantScheme(bits=8, group_size=64, symmetric=False),
    "w2g16seq_mse": QuantScheme(bits=2, group_size=16, symmetric=False, scale_init="mse", grid="seq"),
}


def _linear(in_features=64, out_features=48, bias=True, seed=0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, in_features))  # uneven column ranges
        if bias:
            lin.bias.normal_()
    return lin.to(dtype)


def _x(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _scheme(name: str, **kw) -> QuantScheme:
    return QuantScheme(**{**SCHEMES[name].to_dict(), **kw})


def _manual_act_fake_quant(x):
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).eps)
    return torch.round(x / scale).clamp(-128, 127) * scale


# --------------------------------------------------------------------------------------------
# forward == F.linear(x, on_grid_weight)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme_name", list(SCHEMES))
@pytest.mark.parametrize("mode", ["dynamic", "learnable", "frozen", "act8"])
def test_forward_equals_linear_on_grid_weight(scheme_name, mode):
    scheme = _scheme(scheme_name, learnable=(mode == "learnable"), act_bits=8 if mode == "act8" else None)
    lin = _linear(bias=scheme_name != "w8g64asym")
    q = QATLinear.from_linear(lin, scheme, "layer")
    if mode == "frozen":
        q.freeze()
    x = _x(3, 5, 64)
    with torch.no_grad():
        out = q(x)
    w_grid = q.on_grid_weight()
    if mode == "act8":
        expected = F.linear(_manual_act_fake_quant(x), w_grid, q.bias)
    else:
        expected = F.linear(x, w_grid, q.bias)
    assert torch.equal(out, expected)
    # the on-grid weight differs from the latent one (something was quantized) ...
    if mode != "frozen":
        assert not torch.equal(w_grid, lin.weight.detach())
    # ... and is the dequantized export
    qw = q.quantized_weight()
    assert isinstance(qw, QuantizedWeight) and qw.scheme == scheme
    assert torch.equal(qw.dequantize(torch.float32), w_grid)
    assert qw.codes.dtype == torch.int32
    assert qw.codes.min().item() >= scheme.qmin and qw.codes.max().item() <= scheme.qmax


def test_from_linear_shares_weight_and_matches_grid_functions():
    lin = _linear()
    scheme = SCHEMES["w4g16asym"]
    q = QATLinear.from_linear(lin, scheme, "fc")
    assert isinstance(q, nn.Linear)
    assert q.weight is lin.weight and q.bias is lin.bias
    assert (q.in_features, q.out_features) == (64, 48)
    scale, zero = q.qparams()
    s_ref, z_ref = minmax_qparams(lin.weight.detach(), 4, 16, False)
    assert torch.equal(scale, s_ref) and torch.equal(zero, z_ref)
    assert torch.equal(q.quantized_weight().codes, quantize(lin.weight.detach(), s_ref, z_ref, 4, False, 16))
    assert set(q.state_dict()) == {"weight", "bias", "clip_ratio"}
    assert torch.equal(q.clip_ratio, torch.ones(48, 4))
    assert "w4 g16 asym dynamic" in repr(q)


def test_mse_init_stores_searched_clip_ratio():
    lin = _linear()
    q = QATLinear.from_linear(lin, SCHEMES["w2g32sym_mse"], "fc")
    ratio = mse_clip_ratio(lin.weight.detach(), 2, 32, True)
    assert torch.equal(q.clip_ratio, ratio)
    assert (ratio < 1).any()  # 2 bits: clipping pays off somewhere
    s, z = q.qparams()
    assert torch.equal(s, minmax_qparams(lin.weight.detach(), 2, 32, True, ratio)[0])


def test_dynamic_qparams_follow_the_latent_weight():
    lin = _linear()
    q = QATLinear.from_linear(lin, SCHEMES["w4g32sym"], "fc")
    s0, _ = q.qparams()
    with torch.no_grad():
        q.weight.mul_(2.0)
    s1, _ = q.qparams()
    assert torch.allclose(s1, 2 * s0, rtol=1e-6, atol=0)


def test_dynamic_weight_gradient_is_ste():
    lin = _linear()
    q = QATLinear.from_linear(lin, SCHEMES["w4g32sym"], "fc")
    x = _x(7, 64)
    gy = _x(7, 48, seed=2)
    q(x).backward(gy)
    scale, zero = q.qparams()
    v = group_view(q.weight.detach(), 32) / scale.unsqueeze(-1) + zero.unsqueeze(-1)
    mask = ((torch.round(v) >= -8) & (torch.round(v) <= 7)).reshape(q.weight.shape)
    assert (~mask).any()  # with absmax / 7.5 the positive absmax of a group is clipped
    assert torch.allclose(q.weight.grad, (gy.T @ x) * mask, rtol=1e-6, atol=1e-6)
    assert (q.weight.grad[~mask] == 0).all()


def test_bf16_forward_equals_linear_on_grid_weight():
    lin = _linear(dtype=torch.bfloat16)
    q = QATLinear.from_linear(lin, SCHEMES["w4g16asym"], "fc")
    x = _x(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out = q(x)
    w_grid = q.on_grid_weight()
    assert w_grid.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x, w_grid, q.bias))


# --------------------------------------------------------------------------------------------
# learnable qparams
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_learnable_qparams_are_parameters_with_grads(symmetric):
    scheme = QuantScheme(bits=4, group_size=16, symmetric=symmetric, learnable=True, scale_init="mse")
    lin = _linear()
    q = QATLinear.from_linear(lin, scheme, "fc")
    assert isinstance(q.weight_scale, nn.Parameter) and isinstance(q.weight_zero_point, nn.Parameter)
    params = dict(q.named_parameters())
    assert {"weight", "bias", "weight_scale", "weight_zero_point"} <= set(params)
    assert q.weight_scale.shape == q.weight_zero_point.shape == (48, 4)
    ratio = mse_clip_ratio(lin.weight.detach(), 4, 16, symmetric)
    s_ref, z_ref = minmax_qparams(lin.weight.detach(), 4, 16, symmetric, ratio)
    assert torch.equal(q.weight_scale.detach(), s_ref) and torch.equal(q.weight_zero_point.detach(), z_ref)

    x = _x(6, 64)
    loss = (q(x) - _x(6, 48, seed=5)).pow(2).mean()
    loss.backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    assert q.weight_scale.grad is not None and q.weight_scale.grad.abs().sum() > 0
    if symmetric:
        assert not q.weight_zero_point.requires_grad and q.weight_zero_point.grad is None
    else:
        assert q.weight_zero_point.requires_grad
        assert q.weight_zero_point.grad is not None and q.weight_zero_point.grad.abs().sum() > 0

    # an optimizer step moves the scale; forward still equals F.linear on the (new) grid
    opt = torch.optim.SGD(q.parameters(), lr=1e-2)
    before = q.weight_scale.detach().clone()
    opt.step()
    assert not torch.equal(before, q.weight_scale.detach())
    with torch.no_grad():
        assert torch.equal(q(x), F.linear(x, q.on_grid_weight(), q.bias))


def test_learnable_zero_point_is_rounded_and_clamped_in_forward():
    scheme = QuantScheme(bits=4, group_size=16, symmetric=False, learnable=True)
    q = QATLinear.from_linear(_linear(), scheme, "fc")
    with torch.no_grad():
        q.weight_zero_point.add_(0.3)  # off-integer after an update
        q.weight_zero_point[0, 0] = 40.0  # out of range
    _, z = q.qparams()
    assert torch.equal(z, torch.round(z)) and z.max().item() <= 15 and z.min().item() >= 0
    assert z[0, 0].item() == 15
    qw = q.quantized_weight()
    assert torch.equal(qw.zero_point, z.detach())
    x = _x(3, 64)
    with torch.no_grad():
        assert torch.equal(q(x), F.linear(x, q.on_grid_weight(), q.bias))


def test_lsq_grad_scale_scales_only_the_scale_gradient():
    """quant.lsq_grad_scale: the same forward bit for bit; the scale's gradient times
    1 / sqrt(group_size * qmax), the weight's unchanged."""
    grads = {}
    for flag in (False, True):
        q = QATLinear.from_linear(_linear(), QuantScheme(bits=4, group_size=16, learnable=True, lsq_grad_scale=flag), "fc")
        y = q(_x(6, 64))
        (y - _x(6, 48, seed=5)).pow(2).mean().backward()
        grads[flag] = (y.detach(), q.weight.grad.clone(), q.weight_scale.grad.clone())
    (y0, gw0, gs0), (y1, gw1, gs1) = grads[False], grads[True]
    assert torch.equal(y0, y1) and torch.equal(gw0, gw1)
    assert gs0.abs().sum() > 0
    torch.testing.assert_close(gs1, gs0 / (16 * 7) ** 0.5, rtol=1e-6, atol=0)


def test_learnable_scale_pushed_below_zero_stays_positive():
    """An optimizer may push a learnable scale through zero; forward (and export) use
    max(scale, eps), so the grid never flips sign."""
    q = QATLinear.from_linear(_linear(), QuantScheme(bits=4, group_size=16, learnable=True), "fc")
    with torch.no_grad():
        q.weight_scale[0, 0] = -0.05
    s, _ = q.qparams()
    assert s[0, 0].item() == pytest.approx(SCALE_FLOOR) and (s > 0).all()
    qw = q.quantized_weight()
    assert (qw.scale > 0).all()
    x = _x(3, 64)
    with torch.no_grad():
        assert torch.equal(q(x), F.linear(x, q.on_grid_weight(), q.bias))


# --------------------------------------------------------------------------------------------
# export in a lower-precision scale dtype
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme_name", ["w4g32sym", "w4g16asym", "w8g64asym", "w3chan_asym_mse"])
def test_quantized_weight_bf16_dequantizes_in_bf16(scheme_name):
    scheme = SCHEMES[scheme_name]
    q = QATLinear.from_linear(_linear(), scheme, "fc")
    qw32 = q.quantized_weight()
    qw = q.quantized_weight(dtype=torch.bfloat16)
    assert torch.equal(qw.codes, qw32.codes)  # the codes are kept, only the scale is rounded
    assert qw.scale.dtype == qw.zero_point.dtype == torch.bfloat16
    assert torch.equal(qw.scale, qw32.scale.to(torch.bfloat16))
    g = scheme.group_size or 64
    codes = qw.codes.reshape(48, 64 // g, g).to(torch.bfloat16)
    expected = ((codes - qw.zero_point.unsqueeze(-1)) * qw.scale.unsqueeze(-1)).reshape(48, 64)
    assert expected.dtype == torch.bfloat16
    deq = qw.dequantize(torch.bfloat16)
    assert deq.dtype == torch.bfloat16 and torch.equal(deq, expected)
    assert torch.equal(q.on_grid_weight(torch.bfloat16), expected)
    # close to, but (in general) not equal to, the fp32 grid cast to bf16
    assert torch.allclose(deq.float(), qw32.dequantize(torch.float32), rtol=1e-2, atol=1e-3)


# --------------------------------------------------------------------------------------------
# freeze
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme_name,learnable", [("w4g32sym", False), ("w4g16asym", True), ("w3chan_asym_mse", False)])
def test_freeze_snaps_to_grid_and_stays_bit_identical(scheme_name, learnable):
    scheme = _scheme(scheme_name, learnable=learnable)
    q = QATLinear.from_linear(_linear(), scheme, "fc")
    x = _x(5, 64)
    with torch.no_grad():
        out_before = q(x)
    grid_before = q.on_grid_weight()
    qw_before = q.quantized_weight()

    q.freeze()
    assert q.frozen and "frozen" in repr(q)
    assert torch.equal(q.weight.detach(), grid_before)
    assert not q.weight.requires_grad and not q.bias.requires_grad
    assert "weight_scale" in q._buffers and "weight_zero_point" in q._buffers
    assert set(dict(q.named_parameters())) == {"weight", "bias"}
    assert all(not p.requires_grad for p in q.parameters())
    assert {"weight", "bias", "weight_scale", "weight_zero_point"} == set(q.state_dict())
    assert torch.equal(q.weight_scale, qw_before.scale) and torch.equal(q.weight_zero_point, qw_before.zero_point)
    with torch.no_grad():
        assert torch.equal(q(x), out_before)
    # exporting a frozen layer gives back the same codes and qparams
    qw_after = q.quantized_weight()
    assert torch.equal(qw_after.codes, qw_before.codes)
    assert torch.equal(qw_after.scale, qw_before.scale)
    assert torch.equal(q.on_grid_weight(), grid_before)
    q.freeze()  # idempotent
    assert torch.equal(q.weight.detach(), grid_before)

    # optimizer steps on the whole model leave the frozen layer bit-identical
    model = nn.Sequential(q, nn.GELU(), nn.Linear(48, 8))
    state = {k: v.detach().clone() for k, v in q.state_dict().items()}
    head_before = model[2].weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        opt.zero_grad()
        model(_x(4, 64, seed=10 + step)).pow(2).mean().backward()
        opt.step()
    for k, v in q.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert q.weight.grad is None
    assert not torch.equal(model[2].weight.detach(), head_before)
    with torch.no_grad():
        assert torch.equal(q(x), out_before)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_freeze_mid_training_stays_bit_identical(set_to_none):
    """Freezing a layer that already has gradients and optimizer state (AdamW momentum)."""
    scheme = QuantScheme(bits=4, group_size=16, symmetric=False, learnable=True)
    q = QATLinear.from_linear(_linear(), scheme, "fc")
    opt = torch.optim.AdamW(q.parameters(), lr=1e-2, weight_decay=0.1)
    x = _x(4, 64)
    for _ in range(2):
        opt.zero_grad(set_to_none=set_to_none)
        q(x).pow(2).mean().backward()
        opt.step()
    q.freeze()
    state = {k: v.detach().clone() for k, v in q.state_dict().items()}
    with torch.no_grad():
        out = q(x)
    for _ in range(3):
        opt.zero_grad(set_to_none=set_to_none)
        if any(p.requires_grad for p in q.parameters()):
            q(x).pow(2).mean().backward()
        opt.step()
    for k, v in q.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(q(x), out)


# --------------------------------------------------------------------------------------------
# construction errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_from_linear_rejects_non_finite_weights(bad):
    lin = _linear()
    with torch.no_grad():
        lin.weight[3, 7] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.0\.fc\.weight has 1 non-finite"):
        QATLinear.from_linear(lin, SCHEMES["w4g32sym"], "model.layers.0.fc")


def test_from_linear_rejects_non_dividing_group():
    with pytest.raises(QuantConfigError, match=r"layer 'blk\.fc': group_size 32 does not divide in_features 40"):
        QATLinear.from_linear(nn.Linear(40, 8), SCHEMES["w4g32sym"], "blk.fc")


def test_seq_learnable_layer_trains_its_scales_and_keeps_its_half_integer_zero_point():
    layer = QATLinear.from_linear(_linear(), QuantScheme(bits=2, group_size=16, symmetric=False, learnable=True, grid="seq"), "fc")
    assert not layer.weight_zero_point.requires_grad and torch.equal(layer.weight_zero_point, torch.full_like(layer.weight_zero_point, 1.5))
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    scale0 = layer.weight_scale.detach().clone()
    target = _linear(seed=3)
    for _ in range(5):
        x = _x(8, 64)
        loss = (layer(x) - target(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(layer.weight_scale, scale0)  # LSQ trained the scales
    assert torch.equal(layer.weight_zero_point, torch.full_like(layer.weight_zero_point, 1.5))  # the grid's centre did not move
    qw = layer.quantized_weight()
    assert torch.equal(qw.zero_point, torch.full_like(qw.zero_point, 1.5)) and qw.codes.min() >= 0 and qw.codes.max() <= 3
    torch.testing.assert_close(layer(_x(2, 64)), F.linear(_x(2, 64), qw.dequantize(), layer.bias))
    assert "w2 g16 seq learnable" in repr(layer)


@pytest.mark.parametrize("kernel", ["eager", "compile"])
def test_learnable_qparams_train_under_activation_checkpointing(kernel):
    """LSQ scales (the 2-bit default) inside non-reentrant activation checkpointing: the backward
    unpacks its saved tensors once (a second unpack is an error there), and the gradients equal
    those of the same layer without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16, bias=False)
    layer = QATLinear.from_linear(lin, QuantScheme(bits=2, group_size=32, symmetric=False, learnable=True, grid="seq"))
    layer.kernel = kernel
    x = torch.randn(4, 64)
    layer(x).pow(2).sum().backward()
    ref = (layer.weight.grad.clone(), layer.weight_scale.grad.clone())
    layer.zero_grad()
    checkpoint(lambda t: layer(t), x, use_reentrant=False).pow(2).sum().backward()
    assert torch.equal(layer.weight.grad, ref[0]) and torch.equal(layer.weight_scale.grad, ref[1])
