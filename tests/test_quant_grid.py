"""The quantization grid (qat.quant.grid, qat.quant.scheme): properties, STE, LSQ gradients, edge cases."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qat.quant.grid import (
    dequantize,
    fake_quantize,
    fake_quantize_activation,
    fake_quantize_ste,
    group_view,
    minmax_qparams,
    mse_clip_ratio,
    on_grid,
    qrange,
    quantize,
    round_ste,
)
from qat.quant.scheme import SUPPORTED_BITS, QuantConfigError, QuantScheme

PROPERTY = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,  # the same examples on every run (seeded, reproducible in CI)
    suppress_health_check=[HealthCheck.too_slow],
)

# --------------------------------------------------------------------------------------------
# random weights for the property tests
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    w: torch.Tensor
    bits: int
    symmetric: bool
    group_size: int | None
    scale_init: str
    seq: bool = False  # SEQ's grid (asymmetric codes, zero-point (qmax + qmin) / 2)

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = None
        if self.scale_init == "mse":
            ratio = mse_clip_ratio(self.w, self.bits, self.group_size, self.symmetric, seq=self.seq)
        return minmax_qparams(self.w, self.bits, self.group_size, self.symmetric, ratio, self.seq)

    def args(self):
        return self.bits, self.symmetric, self.group_size


@st.composite
def cases(draw) -> Case:
    bits = draw(st.sampled_from(SUPPORTED_BITS))
    symmetric = draw(st.booleans())
    group = draw(st.sampled_from([4, 8, 16, 32]))
    n_groups = draw(st.integers(1, 4))
    per_channel = draw(st.booleans())
    out_features = draw(st.integers(1, 8))
    scale_init = draw(st.sampled_from(["minmax", "mse"]))
    seed = draw(st.integers(0, 2**31 - 1))
    log_mag = draw(st.floats(-4.0, 2.0))
    sign = draw(st.sampled_from(["mixed", "positive", "negative"]))
    zero_frac = draw(st.sampled_from([0.0, 0.3]))
    outliers = draw(st.booleans())
    seq = not symmetric and draw(st.booleans())

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, group * n_groups, generator=g) * (10.0**log_mag)
    if sign == "positive":
        w = w.abs()
    elif sign == "negative":
        w = -w.abs()
    if outliers:
        w = torch.where(torch.rand(w.shape, generator=g) < 0.05, w * 25.0, w)
    if zero_frac:
        w = torch.where(torch.rand(w.shape, generator=g) < zero_frac, torch.zeros_like(w), w)
    return Case(w, bits, symmetric, None if per_channel else group, scale_init, seq)


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------


@PROPERTY
@given(cases())
def test_codes_in_range_and_dequantize_equals_fake_quantize(c: Case):
    scale, zero = c.qparams()
    codes = quantize(c.w, scale, zero, *c.args())
    assert codes.dtype == torch.int32 and codes.shape == c.w.shape
    assert int(codes.min()) >= c.qmin and int(codes.max()) <= c.qmax
    w_hat = fake_quantize(c.w, scale, zero, *c.args())
    # the one-pass fake-quant is bit-identical to the two-step quantize -> dequantize
    assert torch.equal(dequantize(codes, scale, zero, c.group_size), w_hat)
    assert torch.equal(dequantize(codes, scale, zero, c.group_size, torch.float32), w_hat)


@PROPERTY
@given(cases())
def test_fake_quantized_values_lie_on_the_grid(c: Case):
    scale, zero = c.qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    w_hat = fake_quantize(c.w, scale, zero, *c.args())
    codes = quantize(c.w, scale, zero, *c.args())
    # w_hat / s + z is (up to the last-ulp error of the division) the integer code, in range
    v = group_view(w_hat, c.group_size) / scale.unsqueeze(-1) + zero.unsqueeze(-1)
    k = torch.round(v)
    assert (v - k).abs().max().item() < 1e-3
    assert torch.equal(k.reshape(c.w.shape), codes.float())
    assert k.min().item() >= c.qmin and k.max().item() <= c.qmax
    # and exactly (k - z) * s
    assert torch.equal(((k - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(c.w.shape), w_hat)


@PROPERTY
@given(cases())
def test_at_most_2_pow_bits_distinct_values_per_group(c: Case):
    scale, zero = c.qparams()
    w_hat = group_view(fake_quantize(c.w, scale, zero, *c.args()), c.group_size)
    codes = group_view(quantize(c.w, scale, zero, *c.args()), c.group_size)
    for row in range(w_hat.shape[0]):
        for grp in range(w_hat.shape[1]):
            n_values = torch.unique(w_hat[row, grp]).numel()
            assert n_values <= 2**c.bits
            # distinct values <-> distinct codes (the map code -> value is injective per group)
            assert n_values == torch.unique(codes[row, grp]).numel()


@PROPERTY
@given(cases())
def test_fake_quantize_is_idempotent_with_fixed_qparams(c: Case):
    scale, zero = c.qparams()
    once = fake_quantize(c.w, scale, zero, *c.args())
    twice = fake_quantize(once, scale, zero, *c.args())
    assert torch.equal(once, twice)
    assert torch.equal(quantize(once, scale, zero, *c.args()), quantize(c.w, scale, zero, *c.args()))


@PROPERTY
@given(cases())
def test_zero_points_and_exact_zero(c: Case):
    scale, zero = c.qparams()
    n_groups = 1 if c.group_size is None else c.w.shape[1] // c.group_size
    assert scale.shape == zero.shape == (c.w.shape[0], n_groups)
    if c.seq:  # a fixed half-integer zero-point: levels symmetric about 0, none at 0
        assert torch.equal(zero, torch.full_like(zero, (c.qmax + c.qmin) / 2))
        levels = (torch.arange(c.qmin, c.qmax + 1).float() - zero[0, 0]) * scale[0, 0]
        assert torch.equal(levels, -levels.flip(0)) and (levels != 0).all()
        w_hat = fake_quantize(c.w, scale, zero, *c.args())
        assert ((w_hat / scale.repeat_interleave(c.w.shape[1] // scale.shape[1], 1)).abs() >= 0.5 - 1e-6).all()
        return
    if c.symmetric:
        assert torch.equal(zero, torch.zeros_like(zero))
    else:
        assert torch.equal(zero, torch.round(zero))  # integer-valued
        assert zero.min().item() >= c.qmin and zero.max().item() <= c.qmax
    # 0.0 is exactly representable: it maps to code z and back to exactly 0
    zeros = torch.zeros_like(c.w)
    assert torch.equal(fake_quantize(zeros, scale, zero, *c.args()), zeros)
    zero_codes = group_view(quantize(zeros, scale, zero, *c.args()), c.group_size)
    assert torch.equal(zero_codes.float(), zero.unsqueeze(-1).expand_as(zero_codes))
    # the weights that are exactly zero stay exactly zero
    w_hat = fake_quantize(c.w, scale, zero, *c.args())
    assert (w_hat[c.w == 0] == 0).all()


@PROPERTY
@given(cases())
def test_mse_clip_ratio_never_worse_than_minmax(c: Case):
    ratio = mse_clip_ratio(c.w, c.bits, c.group_size, c.symmetric, seq=c.seq)
    assert ratio.min().item() >= (0.3 if c.seq else 0.5) and ratio.max().item() <= 1.0

    def group_err(r):
        s, z = minmax_qparams(c.w, c.bits, c.group_size, c.symmetric, r, c.seq)
        e = (fake_quantize(c.w, s, z, *c.args()) - c.w).pow(2)
        return group_view(e, c.group_size).sum(-1)

    assert (group_err(ratio) <= group_err(None)).all()


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_symmetric_scale_uses_all_codes(bits):
    """absmax / ((qmax - qmin) / 2): the most negative value lands exactly on qmin."""
    w = torch.tensor([[-3.0, 1.0, 0.5, 2.0]])
    scale, zero = minmax_qparams(w, bits, None, True)
    qmin, qmax = qrange(bits, True)
    assert torch.equal(scale, torch.tensor([[3.0 / ((qmax - qmin) / 2)]]))
    assert quantize(w, scale, zero, bits, True, None)[0, 0].item() == qmin


def test_qrange():
    assert qrange(4, True) == (-8, 7) and qrange(4, False) == (0, 15)
    assert qrange(2, True) == (-2, 1) and qrange(3, False) == (0, 7)
    assert qrange(8, True) == (-128, 127) and qrange(8, False) == (0, 255)
    for bits in SUPPORTED_BITS:
        for sym in (True, False):
            s = QuantScheme(bits=bits, symmetric=sym)
            assert (s.qmin, s.qmax) == qrange(bits, sym)


# --------------------------------------------------------------------------------------------
# straight-through estimator for w
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [16, None])
def test_ste_gradient_is_in_range_mask_times_upstream(bits, symmetric, group_size):
    g = torch.Generator().manual_seed(bits * 10 + symmetric)
    w0 = torch.randn(6, 64, generator=g)
    # clip_ratio < 1 shrinks the range, so the largest weights of every group are clipped
    scale, zero = minmax_qparams(w0, bits, group_size, symmetric, clip_ratio=0.6)
    w = w0.clone().requires_grad_(True)
    y = fake_quantize_ste(w, scale, zero, bits, symmetric, group_size)
    assert torch.equal(y.detach(), fake_quantize(w0, scale, zero, bits, symmetric, group_size))
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)

    qmin, qmax = qrange(bits, symmetric)
    v = group_view(w0, group_size) / scale.unsqueeze(-1) + zero.unsqueeze(-1)
    mask = ((torch.round(v) >= qmin) & (torch.round(v) <= qmax)).reshape(w0.shape)  # the clamp is idle
    assert mask.any() and (~mask).any(), "both branches must be exercised"
    assert torch.equal(w.grad, gy * mask)
    assert (w.grad[~mask] == 0).all()


def test_ste_without_qparam_grads_and_with_fixed_small_scale():
    w0 = torch.linspace(-1, 1, 32).reshape(2, 16)
    scale = torch.full((2, 1), 0.01)  # tiny scale: all but the middle values are clipped
    zero = torch.zeros(2, 1)
    w = w0.clone().requires_grad_(True)
    y = fake_quantize_ste(w, scale, zero, 4, True, None)
    y.sum().backward()
    expected = ((torch.round(w0 / 0.01) >= -8) & (torch.round(w0 / 0.01) <= 7)).float()
    assert 0 < expected.sum() < expected.numel()
    assert torch.equal(w.grad, expected)
    assert scale.grad is None and zero.grad is None


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_passes_weights_that_round_into_range(bits, symmetric):
    """``v`` just above ``qmax`` (or just below ``qmin``) rounds to a valid code: the weight is not
    clipped (its code is its own rounding), so it gets the gradient; past the half-step it does not."""
    qmin, qmax = qrange(bits, symmetric)
    z = 0.0 if symmetric else float(2 ** (bits - 1))  # a mid-range zero-point (unsigned codes)
    v = torch.tensor([qmin - 0.7, qmin - 0.4, qmin + 0.2, qmax - 0.2, qmax + 0.3, qmax + 0.7])
    scale, zero = torch.tensor([[0.5]]), torch.tensor([[z]])
    w = ((v - z) * 0.5).reshape(1, -1).requires_grad_(True)
    y = fake_quantize_ste(w, scale, zero, bits, symmetric, None)
    y.sum().backward()
    assert w.grad.flatten().tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    codes = quantize(w.detach(), scale, zero, bits, symmetric, None).flatten()
    assert codes[1].item() == qmin and codes[4].item() == qmax  # the passed edge weights sit on the end codes


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_mask_is_exactly_round_v_in_range_ties_included(bits, symmetric):
    """The STE mask equals ``qmin <= round(v) <= qmax`` on a dense grid of ``v`` that includes
    every half-integer (the ties of round-half-to-even) around both ends of the range."""
    qmin, qmax = qrange(bits, symmetric)
    z = 0.0 if symmetric else float(2 ** (bits - 1))
    v = torch.arange((qmin - 3) * 8, (qmax + 3) * 8 + 1, dtype=torch.float32) / 8  # steps of 1/8: ties included
    w = ((v - z) * 0.5).reshape(1, -1).requires_grad_(True)
    fake_quantize_ste(w, torch.tensor([[0.5]]), torch.tensor([[z]]), bits, symmetric, None).sum().backward()
    s_qmin, s_qmax = (qmin, qmax) if symmetric else (qmin - 2 ** (bits - 1), qmax - 2 ** (bits - 1))
    vs = v - (0 if symmetric else 2 ** (bits - 1))  # the signed domain the grid rounds in
    expected = ((torch.round(vs) >= s_qmin) & (torch.round(vs) <= s_qmax)).float()
    assert torch.equal(w.grad.flatten(), expected)


def test_absmax_int4_clips_only_the_group_extreme():
    """Symmetric absmax scale (absmax / 7.5): only weights at ``v = +7.5`` (the group's positive
    maximum, which rounds to 8) are clipped; the whole (7, 7.5) band keeps its gradient."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 256, generator=g)
    scale, zero = minmax_qparams(w0, 4, 128, True)
    w = w0.clone().requires_grad_(True)
    fake_quantize_ste(w, scale, zero, 4, True, 128).sum().backward()
    v = group_view(w0, 128) / scale.unsqueeze(-1)
    clipped = (w.grad == 0).reshape(v.shape)
    assert torch.equal(clipped, torch.round(v) > 7)
    assert clipped.sum(-1).max() <= 1  # at most the positive extreme of each group
    assert ((v > 7) & (v < 7.5)).any() and not clipped[(v > 7) & (v < 7.5)].any()


def test_scale_grad_keeps_values_and_scales_the_gradient():
    from qat.quant.grid import lsq_grad_factor, scale_grad

    x = torch.randn(3, 4, requires_grad=True)
    y = scale_grad(x, 0.25)
    assert torch.equal(y, x)
    (y * 2).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.5))
    assert lsq_grad_factor(128, 4, True) == pytest.approx(1 / (128 * 7) ** 0.5)
    assert lsq_grad_factor(64, 2, False) == pytest.approx(1 / (64 * 3) ** 0.5)


def test_positive_floors_scales_at_an_absolute_value():
    from qat.quant.grid import SCALE_FLOOR, positive

    s = torch.tensor([0.5, 1e-9, -0.1, 1e-7], requires_grad=True)
    p = positive(s)
    floor = torch.tensor(SCALE_FLOOR).item()
    assert p.tolist() == [0.5, floor, floor, torch.tensor(1e-7).item()]  # 1e-7 < fp32 eps, kept
    p.sum().backward()
    assert s.grad.tolist() == [1.0, 0.0, 0.0, 1.0]
    # not the dtype's epsilon: bf16's is 0.0078, the size of a W4 scale of a N(0, 0.02) weight
    b = torch.tensor([0.004, 1e-5], dtype=torch.bfloat16)
    assert positive(b).tolist() == b.tolist()
    assert positive(torch.tensor([1e-9], dtype=torch.float16)).item() == torch.finfo(torch.float16).tiny  # fp16: its smallest normal


# --------------------------------------------------------------------------------------------
# LSQ gradients for scale and zero-point
# --------------------------------------------------------------------------------------------


def _lsq_surrogate(w, scale, zero, r, in_range, qbound, group_size):
    """The function whose exact derivative the LSQ rule is (see the test docstring)."""
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    v = group_view(w, group_size) / s + z
    y = torch.where(in_range, (v + r - z) * s, (qbound - z) * s)
    return y.reshape(w.shape)


def _frozen_pieces(w, scale, zero, bits, symmetric, group_size):
    qmin, qmax = qrange(bits, symmetric)
    v0 = group_view(w, group_size) / scale.unsqueeze(-1) + zero.unsqueeze(-1)
    r = torch.round(v0) - v0
    in_range = (torch.round(v0) >= qmin) & (torch.round(v0) <= qmax)
    qbound = torch.round(v0).clamp(qmin, qmax)
    return r, in_range, qbound


@pytest.mark.parametrize(
    "bits,symmetric,group_size", [(4, True, 16), (4, False, 16), (3, False, None), (2, True, 8), (8, False, 32)]
)
def test_lsq_gradients_match_finite_differences_of_surrogate(bits, symmetric, group_size):
    """LSQ = the exact derivative of a frozen-residual surrogate.

    At the evaluation point (s0, z0) let ``v0 = w / s0 + z0``, the rounding residual
    ``r = round(v0) - v0`` and the clamp branch (in range: ``qmin <= v0 <= qmax``) be held fixed.
    The surrogate is, with ``v = w / s + z``:

    - in range: ``y(s, z) = (v + r - z) * s``   (so dy/ds = r = q - v, dy/dz = 0);
    - clipped:  ``y(s, z) = (qbound - z) * s``  (so dy/ds = qbound - z, dy/dz = -s),

    and at (s0, z0) it equals the fake-quantized weight. We check, in float64, that (1) the
    surrogate's autograd gradients agree with central finite differences (``gradcheck``),
    (2) the custom autograd Function's gradients for scale and zero-point equal the surrogate's
    autograd gradients for an arbitrary upstream gradient, and (3) they equal central finite
    differences of ``sum(gy * surrogate)`` computed directly.
    """
    g = torch.Generator().manual_seed(1234 + bits)
    w = torch.randn(4, 64, generator=g, dtype=torch.float64)
    if not symmetric:
        w = w + 0.3  # an off-centre range so the zero-point is not at the middle code
    s0, z0 = minmax_qparams(w, bits, group_size, symmetric, clip_ratio=0.7)
    s0 = s0 * 1.013  # move off the exact min-max point (no value sits exactly on a bound)
    r, in_range, qbound = _frozen_pieces(w, s0, z0, bits, symmetric, group_size)
    assert in_range.any() and (~in_range).any()

    # the surrogate reproduces the fake-quantized weight at the evaluation point
    surr0 = _lsq_surrogate(w, s0, z0, r, in_range, qbound, group_size)
    assert torch.allclose(surr0, fake_quantize(w, s0, z0, bits, symmetric, group_size), rtol=0, atol=1e-12)

    # (1) finite differences of the surrogate (float64)
    def f(s, z):
        return _lsq_surrogate(w, s, z, r, in_range, qbound, group_size)

    assert torch.autograd.gradcheck(
        f, (s0.clone().requires_grad_(True), z0.clone().requires_grad_(True)), eps=1e-6, atol=1e-7
    )

    # (2) the custom Function's gradients == the surrogate's autograd gradients
    gy = torch.randn(w.shape, generator=g, dtype=torch.float64)
    s_a, z_a = s0.clone().requires_grad_(True), z0.clone().requires_grad_(True)
    w_a = w.clone().requires_grad_(True)
    fake_quantize_ste(w_a, s_a, z_a, bits, symmetric, group_size).backward(gy)
    s_b, z_b = s0.clone().requires_grad_(True), z0.clone().requires_grad_(True)
    f(s_b, z_b).backward(gy)
    assert torch.allclose(s_a.grad, s_b.grad, rtol=1e-10, atol=1e-10)
    assert torch.allclose(z_a.grad, z_b.grad, rtol=1e-10, atol=1e-10)
    assert s_a.grad.abs().sum() > 0 and z_a.grad.abs().sum() > 0

    # closed form: dy/ds = q - v (in range), q - z (clipped); dy/dz = 0 (in range), -s (clipped)
    qmin, qmax = qrange(bits, symmetric)
    v0 = group_view(w, group_size) / s0.unsqueeze(-1) + z0.unsqueeze(-1)
    q0 = torch.round(v0).clamp(qmin, qmax)
    gyg = group_view(gy, group_size)
    ds = torch.where(in_range, q0 - v0, q0 - z0.unsqueeze(-1))
    dz = torch.where(in_range, torch.zeros_like(v0), -s0.unsqueeze(-1).expand_as(v0))
    assert torch.allclose(s_a.grad, (gyg * ds).sum(-1), rtol=1e-12, atol=1e-12)
    assert torch.allclose(z_a.grad, (gyg * dz).sum(-1), rtol=1e-12, atol=1e-12)
    # the weight still gets the plain STE
    assert torch.equal(w_a.grad, (gyg * in_range).reshape(w.shape))

    # (3) central finite differences of L(s, z) = sum(gy * surrogate(s, z)), element by element
    def loss(s, z):
        return (gy * f(s, z)).sum().item()

    h = 1e-6
    for idx in [(0, 0), (1, -1), (3, 0), (2, -1)]:
        e = torch.zeros_like(s0)
        e[idx] = h
        fd_s = (loss(s0 + e, z0) - loss(s0 - e, z0)) / (2 * h)
        fd_z = (loss(s0, z0 + e) - loss(s0, z0 - e)) / (2 * h)
        assert fd_s == pytest.approx(s_a.grad[idx].item(), rel=1e-6, abs=1e-6)
        assert fd_z == pytest.approx(z_a.grad[idx].item(), rel=1e-6, abs=1e-6)


def test_lsq_grads_in_float32_keep_qparam_dtype():
    w = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    s, z = minmax_qparams(w, 4, 16, False, clip_ratio=0.8)
    s.requires_grad_(True)
    z.requires_grad_(True)
    fake_quantize_ste(w, s, z, 4, False, 16).sum().backward()
    assert s.grad.dtype == torch.float32 and s.grad.shape == s.shape
    assert z.grad.dtype == torch.float32 and z.grad.shape == z.shape


def test_round_ste_value_and_identity_gradient():
    x = torch.tensor([0.2, 1.5, 2.5, -0.7, 3.0], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))


def test_fake_quantize_activation_per_token():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 24, generator=g) * torch.tensor([0.01, 1.0, 30.0, 1.0, 2.0]).view(1, 5, 1)
    x[0, 3] = 0.0  # an all-zero token
    xr = x.clone().requires_grad_(True)
    y = fake_quantize_activation(xr, 8)
    scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).eps)
    expected = torch.round(x / scale).clamp(-128, 127) * scale
    assert torch.equal(y.detach(), expected)
    assert torch.equal(y[0, 3].detach(), torch.zeros(24))
    # per token: at most 255 distinct values and the absmax is exact
    assert torch.equal(y.detach().abs().amax(-1), x.abs().amax(-1))
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    assert torch.equal(xr.grad, gy)  # nothing is clipped: the STE is the identity


# --------------------------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_group(bits, symmetric):
    w = torch.randn(3, 32, generator=torch.Generator().manual_seed(bits))
    w[1, 8:16] = 0.0  # one all-zero group of 8
    w[2] = 0.0  # an all-zero row
    scale, zero = minmax_qparams(w, bits, 8, symmetric)
    eps = torch.finfo(torch.float32).eps
    assert scale[1, 1].item() == eps and (scale[2] == eps).all()
    assert (zero[1, 1] == 0).item() and (zero[2] == 0).all()
    codes = quantize(w, scale, zero, bits, symmetric, 8)
    assert (codes[1, 8:16] == 0).all() and (codes[2] == 0).all()
    w_hat = fake_quantize(w, scale, zero, bits, symmetric, 8)
    assert torch.equal(w_hat[1, 8:16], torch.zeros(8)) and torch.equal(w_hat[2], torch.zeros(32))
    # per-channel too
    s_c, z_c = minmax_qparams(w, bits, None, symmetric)
    assert s_c[2, 0].item() == eps
    assert torch.equal(fake_quantize(w, s_c, z_c, bits, symmetric, None)[2], torch.zeros(32))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("c", [0.37, -0.37])
def test_constant_group(bits, symmetric, c):
    w = torch.full((2, 16), c)
    scale, zero = minmax_qparams(w, bits, 8, symmetric)
    codes = quantize(w, scale, zero, bits, symmetric, 8)
    w_hat = fake_quantize(w, scale, zero, bits, symmetric, 8)
    qmin, qmax = qrange(bits, symmetric)
    assert torch.unique(codes).numel() == 1 and torch.unique(w_hat).numel() == 1
    if symmetric:
        # absmax maps to +-(qmax - qmin) / 2: -c lands on qmin, +c on qmax after the clamp
        assert scale[0, 0].item() == pytest.approx(abs(c) / ((qmax - qmin) / 2), rel=1e-7)
        assert codes[0, 0].item() == (qmin if c < 0 else qmax)
    else:
        # the range is widened to include 0: [0, c] or [c, 0]
        assert scale[0, 0].item() == pytest.approx(abs(c) / (qmax - qmin), rel=1e-7)
        assert zero[0, 0].item() == (qmax if c < 0 else qmin)
        assert codes[0, 0].item() == (qmin if c < 0 else qmax)
    assert abs(w_hat[0, 0].item() - c) <= scale[0, 0].item() / 2 + 1e-7


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("symmetric,group,seq", [(True, 8, False), (False, 8, False), (False, None, True), (True, None, False)])
def test_non_finite_weights_raise(bad, symmetric, group, seq):
    """Checked on the qparams (a bad weight makes its group's scale non-finite), named by count."""
    w = torch.randn(4, 16)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"1 non-finite \(inf/NaN\) values"):
        minmax_qparams(w, 4, group, symmetric, seq=seq)
    with pytest.raises(ValueError, match=r"1 non-finite \(inf/NaN\) values"):
        minmax_qparams(w, 4, group, symmetric, torch.full((4, 16 // (group or 16)), 0.7), seq=seq)
    with pytest.raises(ValueError, match="non-finite"):
        mse_clip_ratio(w, 4, 8, False)


def test_group_view_rejects_non_dividing_group():
    with pytest.raises(ValueError, match="group_size 32 does not divide in_features 48"):
        group_view(torch.zeros(2, 48), 32)
    assert group_view(torch.zeros(2, 48), None).shape == (2, 1, 48)
    assert group_view(torch.zeros(2, 48), 16).shape == (2, 3, 16)


@pytest.mark.parametrize("bits", [5, 1, 0, 16, True, False, 4.0, "4", None])
def test_invalid_bits(bits):
    with pytest.raises(QuantConfigError, match="bits must be one of"):
        QuantScheme(bits=bits)


@pytest.mark.parametrize("group_size", [0, -32, True, 32.0, "128"])
def test_invalid_group_size(group_size):
    with pytest.raises(QuantConfigError, match="group_size must be a positive integer"):
        QuantScheme(group_size=group_size)


def test_invalid_scale_init_and_act_bits():
    with pytest.raises(QuantConfigError, match="scale_init"):
        QuantScheme(scale_init="percentile")
    with pytest.raises(QuantConfigError, match="act_bits"):
        QuantScheme(act_bits=4)
    assert issubclass(QuantConfigError, ValueError)


def test_scheme_properties_and_check_layer():
    s = QuantScheme(bits=3, group_size=64, symmetric=False)
    assert s.granularity == "group" and QuantScheme(group_size=None).granularity == "channel"
    assert s.to_dict()["bits"] == 3 and s.to_dict()["group_size"] == 64
    s.check_layer("ok", 128)
    with pytest.raises(QuantConfigError, match=r"layer 'model.fc': group_size 64 does not divide in_features 96"):
        s.check_layer("model.fc", 96)
    QuantScheme(group_size=None).check_layer("any", 97)
    with pytest.raises(Exception):
        s.bits = 4  # frozen dataclass


# --------------------------------------------------------------------------------------------
# SEQ's grid (ParetoQ's stretched elastic quantizer)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_seq_levels_are_paretoq_half_integers_and_the_absmax_is_the_outer_level(bits):
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    scale, zero = minmax_qparams(w, bits, 32, False, seq=True)
    half = (2**bits - 1) / 2
    assert torch.equal(zero, torch.full_like(zero, half))
    torch.testing.assert_close(scale, group_view(w, 32).abs().amax(-1) / half)  # absmax / 1.5 at 2 bits
    steps = fake_quantize(w, scale, zero, bits, False, 32) / scale.repeat_interleave(32, 1)
    assert (steps - torch.round(steps * 2) / 2).abs().max() < 1e-5  # half-integers, up to the division's ulp
    assert torch.equal((torch.round(steps * 2) / 2).unique(), torch.arange(-half, half + 1))  # {-1.5, -0.5, 0.5, 1.5} at 2 bits
    # the group's absmax lands on the outer level itself (unclipped), which an integer grid cannot
    # do for both signs
    top = group_view(w, 32).abs().argmax(-1, keepdim=True)
    w_top, w_hat_top = (group_view(t, 32).gather(-1, top) for t in (w, fake_quantize(w, scale, zero, bits, False, 32)))
    torch.testing.assert_close(w_hat_top, w_top)


def test_seq_clip_search_goes_below_one_half_for_a_group_with_an_outlier():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    w[:, 0] = 5.0  # one outlier per row: the best 2-bit grid gives it up and fits the bulk
    ratio = mse_clip_ratio(w, 2, 64, False, seq=True)
    assert (ratio < 0.5).all() and (ratio >= 0.3).all()
    assert (mse_clip_ratio(w, 2, 64, False) >= 0.5).all()  # the integer grid's search stops at 0.5


def test_seq_needs_asymmetric_codes():
    with pytest.raises(QuantConfigError, match="symmetric=False"):
        QuantScheme(bits=2, symmetric=True, grid="seq")
    with pytest.raises(QuantConfigError, match="grid must be one of"):
        QuantScheme(bits=2, symmetric=False, grid="nf")
    with pytest.raises(ValueError, match="symmetric must be False"):
        minmax_qparams(torch.ones(2, 8), 2, 8, True, seq=True)
    s = QuantScheme(bits=2, symmetric=False, learnable=True, grid="seq")
    assert s.seq and not s.trains_zero_point
    assert QuantScheme(bits=2, symmetric=False, learnable=True).trains_zero_point


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric,group,seq", [(True, 32, False), (False, 32, False), (False, None, True), (True, None, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_on_grid_is_dequantize_of_quantize(bits, symmetric, group, seq, dtype):
    """final/'s weights without the int32 codes: bit-identical to dequantize(quantize()) with the
    qparams as stored (rounded to the checkpoint's dtype), leading expert dimension included."""
    torch.manual_seed(bits)
    for shape in ((24, 64), (3, 8, 64)):
        w = torch.randn(*shape) * 0.05
        scale, zero = minmax_qparams(w, bits, group, symmetric, 0.9, seq)
        codes = quantize(w, scale, zero, bits, symmetric, group)
        sd, zd = scale.to(dtype), zero.to(dtype)
        want = dequantize(codes, sd, zd, group, dtype)
        got = on_grid(w, scale, zero, bits, symmetric, group, sd, zd, dtype)
        assert got.dtype == dtype and got.shape == w.shape
        bits_of = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(got.view(bits_of), want.view(bits_of))  # bit for bit, signed zeros included
