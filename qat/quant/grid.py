"""The quantization grid, written once: qparams, quantize, dequantize, fake-quantize, STE / LSQ.

Every path in qat (QAT training, the PTQ baselines, export) calls these functions, so that the
weights that were trained are exactly the weights that are evaluated and served.

Shapes: a weight ``w`` is ``[out_features, in_features]``; with ``group_size`` g (or ``None`` =
one group spanning the whole row, i.e. per-channel) its scale and zero-point are
``[out_features, in_features // g]``. Zero-points are float tensors holding integers.

Numerics follow compressed-tensors (what vLLM serves):
``q = clamp(round(w / s + z), qmin, qmax)``, ``w_hat = (q - z) * s``; symmetric scales are
``absmax / ((qmax - qmin) / 2)`` (so int4 uses absmax / 7.5 and all 16 codes), asymmetric
``(max - min) / (qmax - qmin)`` with the range widened to include 0; a zero scale becomes the
dtype's eps. ``fake_quantize(w) == dequantize(quantize(w))`` bit for bit.

SEQ (``seq=True``, ParetoQ's stretched elastic grid) is the asymmetric grid with the zero-point
fixed at ``(qmax + qmin) / 2`` (1.5 at 2 bits) and the symmetric scale ``absmax / ((qmax - qmin) / 2)``:
its levels are symmetric about 0 with no zero level. Only the qparams differ; quantize,
dequantize and the STE take its half-integer zero-point as they take any other.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "qrange",
    "group_view",
    "minmax_qparams",
    "minmax_qparams_unchecked",
    "mse_clip_ratio",
    "clip_search",
    "quantize",
    "dequantize",
    "fake_quantize",
    "fake_quantize_ste",
    "fake_quantize_masked",
    "lsq_qparam_grad_terms",
    "lsq_qparam_grads",
    "round_ste",
    "scale_grad",
    "lsq_grad_factor",
    "positive",
    "fake_quantize_activation",
    "check_finite",
]

MSE_MIN_CLIP, MSE_CLIP_GRID = 0.5, 20  # clip ratios 1.0, 0.975, ..., 0.525 searched by the `mse` scale init
# SEQ's grid has no zero level and fits the bulk of a group: at W2g64 on llama-small the best outer
# level sits at a median 0.575 of the group's absmax and 18 % of groups want less than 0.5, so its
# search goes on to 0.325 (same 0.025 step)
SEQ_MIN_CLIP, SEQ_CLIP_GRID = 0.3, 28


def clip_search(seq: bool) -> tuple[int, float]:
    """``(number of ratios, smallest ratio)`` a clip search tries by default on the grid (1.0 first,
    steps of 0.025): from 0.5 on the integer grid, from 0.3 on SEQ's."""
    return (SEQ_CLIP_GRID, SEQ_MIN_CLIP) if seq else (MSE_CLIP_GRID, MSE_MIN_CLIP)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: signed for symmetric, unsigned for asymmetric."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def group_view(w: Tensor, group_size: int | None) -> Tensor:
    """``[..., out, in]`` -> ``[..., out, n_groups, group_size]`` (a view; per-channel = one group).
    Leading dimensions are independent matrices: a fused MoE tensor ``[experts, out, in]`` is
    quantized expert by expert, row by row, exactly as each expert's Linear would be."""
    *lead, in_features = w.shape
    g = in_features if group_size is None else group_size
    if in_features % g != 0:
        raise ValueError(f"group_size {g} does not divide in_features {in_features}")
    return w.reshape(*lead, in_features // g, g)


def check_finite(w: Tensor, name: str = "weight") -> None:
    if w.is_meta:  # shape-only dry runs (recipe validation before weights load)
        return
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"{name} has {bad} non-finite (inf/NaN) values; cannot quantize it")


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@torch.no_grad()
def minmax_qparams(
    w: Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    clip_ratio: Tensor | float | None = None,
    seq: bool = False,
) -> tuple[Tensor, Tensor]:
    """Scale and zero-point per (row, group) from the group's range, optionally shrunk by
    ``clip_ratio`` (a scalar or a ``[out, n_groups]`` tensor in (0, 1]); ``seq``: SEQ's grid
    (needs ``symmetric=False``). A non-finite weight raises: it makes its group's range, so
    its scale, non-finite, which is checked on the qparams (a pass over the weight only then)."""
    scale, zero = minmax_qparams_unchecked(w, bits, group_size, symmetric, clip_ratio, seq)
    if not w.is_meta and not bool(torch.isfinite(scale).all()):
        check_finite(w)
    return scale, zero


def minmax_qparams_unchecked(
    w: Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    clip_ratio: Tensor | float | None = None,
    seq: bool = False,
) -> tuple[Tensor, Tensor]:
    """``minmax_qparams`` without the finiteness check (which syncs a GPU with the host): the
    body the fused training kernels compile (``qat/quant/fused.py``). Same values, bit for bit."""
    if seq and symmetric:
        raise ValueError("the SEQ grid has unsigned codes around a half-integer zero-point: symmetric must be False")
    wg = group_view(w, group_size)
    lo = wg.amin(dim=-1).clamp(max=0)
    hi = wg.amax(dim=-1).clamp(min=0)
    if clip_ratio is not None:
        lo = lo * clip_ratio
        hi = hi * clip_ratio
    qmin, qmax = qrange(bits, symmetric)
    if symmetric or seq:
        scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
        zero = torch.full_like(scale, 0.0 if symmetric else (qmax + qmin) / 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale == 0, torch.full_like(scale, _eps(scale.dtype)), scale)
    if not (symmetric or seq):
        # in compressed-tensors' signed domain, then shifted (bit-identical zero-points)
        off = _asym_offset(bits)
        zero = torch.round((qmin - off - lo / scale).clamp(qmin - off, qmax - off)) + off
    return scale, zero


def _expand(t: Tensor) -> Tensor:
    return t.unsqueeze(-1)


def _asym_offset(bits: int) -> int:
    return 2 ** (bits - 1)


def _signed_codes(wg: Tensor, s: Tensor, z: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """``v = w / s + z`` and ``q = clamp(round(v), qmin, qmax)`` computed in the *signed* code
    domain, as compressed-tensors does: asymmetric codes and zero-points are shifted by
    ``-2^(b-1)`` first (exact for these small integers), so ``w / s + z`` is rounded to float at
    the same magnitude as theirs and ties round the same way. Returns ``(v, q, z, lo, hi)``
    in that domain; unsigned codes are ``q + 2^(b-1)`` and ``q - z`` is unchanged."""
    qmin, qmax = qrange(bits, symmetric)
    if not symmetric:
        off = _asym_offset(bits)
        z, qmin, qmax = z - off, qmin - off, qmax - off
    v = wg / s + z
    return v, torch.round(v).clamp(qmin, qmax), z, qmin, qmax


@torch.no_grad()
def mse_clip_ratio(
    w: Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    grid: int | None = None,
    min_ratio: float | None = None,
    norm: float = 2.0,
    seq: bool = False,
) -> Tensor:
    """Per-group clip ratio in ``[min_ratio, 1]`` minimising ``sum |w - Q(w)|^norm`` over the group
    (``grid`` ratios, 1.0 first; a ``None`` takes ``clip_search(seq)``'s)."""
    default_grid, default_min = clip_search(seq)
    grid = default_grid if grid is None else grid
    min_ratio = default_min if min_ratio is None else min_ratio
    best_err = None
    best_ratio = None
    wg = group_view(w, group_size)
    for i in range(grid):
        r = 1.0 - (1.0 - min_ratio) * i / grid
        scale, zero = minmax_qparams(w, bits, group_size, symmetric, clip_ratio=r, seq=seq)
        err = (fake_quantize(w, scale, zero, bits, symmetric, group_size) - w).abs().pow(norm)
        err = group_view(err, group_size).sum(-1)
        ratio = torch.full(err.shape, r, dtype=wg.dtype, device=w.device)
        if best_err is None:
            best_err, best_ratio = err, ratio
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, ratio, best_ratio)
    return best_ratio


def quantize(
    w: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool, group_size: int | None
) -> Tensor:
    """Integer codes ``clamp(round(w / s + z), qmin, qmax)`` as int32, shape of ``w``."""
    _, q, _, _, _ = _signed_codes(group_view(w, group_size), _expand(scale), _expand(zero), bits, symmetric)
    if not symmetric:
        q = q + _asym_offset(bits)
    return q.reshape(w.shape).to(torch.int32)


def dequantize(
    codes: Tensor, scale: Tensor, zero: Tensor, group_size: int | None, dtype: torch.dtype | None = None
) -> Tensor:
    """``(q - z) * s`` computed in the scale's dtype, then cast to ``dtype`` (default: scale's)."""
    q = group_view(codes, group_size).to(scale.dtype)
    w = ((q - _expand(zero)) * _expand(scale)).reshape(codes.shape)
    return w if dtype is None else w.to(dtype)


@torch.no_grad()
def on_grid(
    w: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool, group_size: int | None,
    out_scale: Tensor, out_zero: Tensor, dtype: torch.dtype,
) -> Tensor:
    """``dequantize(quantize(w, scale, zero), out_scale, out_zero, group_size, dtype)`` bit for
    bit, without the int32 codes and in place where it can: the weights ``final/`` holds (codes
    from the trained qparams, mapped back with the qparams as stored, e.g. rounded to bf16)."""
    _, q, _, _, _ = _signed_codes(group_view(w, group_size), _expand(scale), _expand(zero), bits, symmetric)
    q.add_(0.0 if symmetric else _asym_offset(bits))  # unsigned codes; + 0.0 makes a -0.0 code the int32 path's +0
    q = q.to(out_scale.dtype)
    return q.sub_(_expand(out_zero)).mul_(_expand(out_scale)).reshape(w.shape).to(dtype)


def fake_quantize(
    w: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool, group_size: int | None
) -> Tensor:
    """``dequantize(quantize(w))`` in one pass, bit-exactly, in the scale's dtype (no autograd rule)."""
    s = _expand(scale)
    _, q, z, _, _ = _signed_codes(group_view(w, group_size), s, _expand(zero), bits, symmetric)
    return ((q - z) * s).reshape(w.shape)


def _in_range(v: Tensor, qmin: int, qmax: int) -> Tensor:
    """Where the clamp is idle: ``round(v)`` (``v = w / s + z``) is a valid code, so the weight's
    code is its own rounding and the STE passes the gradient. A weight with ``v`` in
    ``(qmax, qmax + 0.5)`` rounds to ``qmax``: it is not clipped, and gets its gradient (a test of
    ``v <= qmax`` would drop it: 0.6 % of llama-small's weights at W4, 4.7 % at W2).

    Written as a range, without a second ``round``: in the signed code domain ``qmin = -2^(b-1)``
    is even and ``qmax`` odd, so under round-half-to-even ``qmin - 0.5`` rounds to ``qmin`` (in)
    and ``qmax + 0.5`` to ``qmax + 1`` (out)."""
    return (v >= qmin - 0.5) & (v < qmax + 0.5)


def _lsq_scale_term(gyg: Tensor, in_range: Tensor, v: Tensor, q: Tensor, z: Tensor) -> Tensor:
    """Per-weight LSQ term of the scale gradient: the incoming gradient times ``q - v`` in range,
    ``q - z`` clipped (grouped shapes)."""
    return gyg * torch.where(in_range, q - v, q - z)


def _lsq_zero_term(gyg: Tensor, in_range: Tensor, s: Tensor) -> Tensor:
    """Per-weight LSQ term of the zero-point gradient: 0 in range, ``-s`` clipped."""
    return gyg * torch.where(in_range, 0.0, -s)


class _FakeQuantSTE(torch.autograd.Function):
    """Fake-quantize with a straight-through estimator for ``w`` and LSQ gradients for the
    scale and zero-point.

    With ``v = w / s + z`` and ``q = clamp(round(v), qmin, qmax)``, ``y = (q - z) * s``:

    - ``dy/dw = 1`` where ``qmin <= round(v) <= qmax`` (in range: the clamp is idle), else 0 (clipped);
    - ``dy/ds = q - v`` in range (LSQ: round treated as identity in the derivative), ``q - z`` clipped;
    - ``dy/dz = 0`` in range, ``-s`` clipped.

    Only a boolean mask is kept for the backward when the qparams need no gradient.
    """

    @staticmethod
    def forward(ctx, w, scale, zero, bits: int, symmetric: bool, group_size: int | None):
        s = _expand(scale)
        v, q, z, qmin, qmax = _signed_codes(group_view(w, group_size), s, _expand(zero), bits, symmetric)
        y = ((q - z) * s).reshape(w.shape)
        in_range = _in_range(v, qmin, qmax)
        ctx.group_size = group_size
        ctx.qparam_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        if ctx.qparam_grads:
            ctx.save_for_backward(in_range, v, q, scale, z)  # v, q, z in the signed domain
        else:
            ctx.save_for_backward(in_range)
        return y

    @staticmethod
    def backward(ctx, gy):
        saved = ctx.saved_tensors  # unpacked once: activation checkpointing allows no second unpack
        in_range = saved[0]
        gyg = group_view(gy, ctx.group_size)
        gw = (gyg * in_range).reshape(gy.shape) if ctx.needs_input_grad[0] else None
        gs = gz = None
        if ctx.qparam_grads:
            _, v, q, scale, z = saved
            if ctx.needs_input_grad[1]:
                gs = _lsq_scale_term(gyg, in_range, v, q, z).sum(-1).to(scale.dtype)
            if ctx.needs_input_grad[2]:
                gz = _lsq_zero_term(gyg, in_range, _expand(scale)).sum(-1).to(z.dtype)
        return gw, gs, gz, None, None, None


def fake_quantize_ste(
    w: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool, group_size: int | None
) -> Tensor:
    """``fake_quantize`` with the STE / LSQ autograd rule (same forward values, bit for bit)."""
    return _FakeQuantSTE.apply(w, scale, zero, bits, symmetric, group_size)


def fake_quantize_masked(
    w: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool, group_size: int | None
) -> tuple[Tensor, Tensor]:
    """``fake_quantize`` plus the STE's mask ``[out, n_groups, g]`` (True where ``w / s + z`` is
    inside the code range): the forward of ``_FakeQuantSTE``, as one pure function."""
    s = _expand(scale)
    v, q, z, qmin, qmax = _signed_codes(group_view(w, group_size), s, _expand(zero), bits, symmetric)
    return ((q - z) * s).reshape(w.shape), _in_range(v, qmin, qmax)


def lsq_qparam_grad_terms(
    gy: Tensor, w: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool, group_size: int | None
) -> tuple[Tensor, Tensor]:
    """Per-weight terms ``[out, n_groups, g]`` of the LSQ gradients of ``_FakeQuantSTE`` for the
    scale and zero-point, recomputing ``v`` and ``q`` from ``w`` instead of keeping them; their
    ``.sum(-1)`` are the gradients (``lsq_qparam_grads``)."""
    s = _expand(scale)
    v, q, z, qmin, qmax = _signed_codes(group_view(w, group_size), s, _expand(zero), bits, symmetric)
    gyg, in_range = group_view(gy, group_size), _in_range(v, qmin, qmax)
    return _lsq_scale_term(gyg, in_range, v, q, z), _lsq_zero_term(gyg, in_range, s)


def lsq_qparam_grads(
    gy: Tensor, w: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool, group_size: int | None
) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(gy * fake_quantize(w))`` for the scale and zero-point (LSQ rule of
    ``_FakeQuantSTE``)."""
    ts, tz = lsq_qparam_grad_terms(gy, w, scale, zero, bits, symmetric, group_size)
    return ts.sum(-1).to(scale.dtype), tz.sum(-1).to(zero.dtype)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """``x`` unchanged (bit for bit) whose gradient is multiplied by ``factor``."""
    return _ScaleGrad.apply(x, factor)


def lsq_grad_factor(group_size: int, bits: int, symmetric: bool) -> float:
    """LSQ's gradient scale for a step size shared by ``group_size`` weights: ``1 / sqrt(N * Qp)``
    (Esser et al., 2020), ``Qp`` the largest positive code (``2^(b-1) - 1`` symmetric, ``2^b - 1``
    asymmetric). It balances the step size's update against the weights' under SGD; with Adam it
    mainly changes how much the scales weigh in the global gradient norm that clipping reads."""
    _, qmax = qrange(bits, symmetric)
    return 1.0 / (group_size * qmax) ** 0.5


SCALE_FLOOR = 1e-8  # far below any trained scale: |w| of 1e-8 is no weight a model uses


def positive(scale: Tensor) -> Tensor:
    """A learnable scale kept positive: ``max(scale, floor)`` (no gradient below the floor). A
    scale that an optimizer pushes through zero would flip its group's grid. The floor is an
    absolute value, not the dtype's epsilon (0.0078 in bf16: the size of a W4 scale of a
    N(0, 0.02) weight), raised only to the smallest normal number of the dtype (fp16: 6.1e-5)."""
    return scale.clamp(min=max(SCALE_FLOOR, torch.finfo(scale.dtype).tiny))


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` whose gradient is the identity (for learnable integer zero-points)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize_activation(x: Tensor, bits: int = 8) -> Tensor:
    """Per-token dynamic symmetric fake-quant of activations (last dim = features), STE gradient.

    The scale is ``absmax / qmax`` per token, so nothing is clipped and the STE is the identity.
    """
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = (xf.detach().abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=_eps(torch.float32))
    xq = (torch.round(xf / scale).clamp(-qmax - 1, qmax) * scale).to(x.dtype)
    return x + (xq - x).detach()
