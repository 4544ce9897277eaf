"""Fused fake-quant for training: the grid functions of ``grid.py`` compiled into few kernels.

The eager path (``QATLinear.fake_quantized_weight``: ``minmax_qparams`` then
``fake_quantize_ste``) launches about a dozen elementwise / reduction kernels per layer and
keeps full-size float tensors for its backward. Here one autograd function

- in its forward runs ``torch.compile`` of the *same* pure functions of ``grid.py`` (qparams,
  fake-quant, the STE mask), cast straight to the dtype ``F.linear`` consumes (the autocast
  dtype under mixed precision: no float32 copy of the quantized weight), and keeps only the
  boolean mask (1 byte per weight) for the backward: the quantized weight is computed once;
- in its backward multiplies the incoming gradient by that mask (compiled too), and for learnable
  qparams recomputes ``w / s + z`` from the weight it already holds (``grid.lsq_qparam_grad_terms``,
  compiled) rather than keeping float32 copies of it; the per-group sums of those terms run
  eagerly, so that they add in the eager order.

Numerics are those of the eager path bit for bit (``tests/test_quant_fused.py``): the compiled
functions are the grid's own, and gradients are formed in the dtype the eager path forms them.
On CUDA inductor emits Triton kernels; on CPU, C++ (gcc). ``quant.kernel`` chooses:
``auto`` (compile on CUDA, eager elsewhere), ``eager``, ``compile``.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from . import grid

KERNELS = ("auto", "eager", "compile")
_state = {"kernel": "auto"}


def set_kernel(name: str) -> None:
    """The process default of the fake-quant implementation, for layers that do not choose
    (``QATLinear.kernel`` is None); the environment variable ``QAT_QUANT_KERNEL`` sets it, e.g. for
    benchmarks. A recipe's ``quant.kernel`` is set per layer (``qat.quant.apply.set_kernel``)."""
    if name not in KERNELS:
        raise ValueError(f"quant.kernel must be one of {KERNELS}, got {name!r}")
    _state["kernel"] = name


set_kernel(os.environ.get("QAT_QUANT_KERNEL", "auto"))


def get_kernel() -> str:
    return _state["kernel"]


def use_fused(device: torch.device, kernel: str | None = None) -> bool:
    """Whether a layer whose weight lives on ``device`` takes the compiled path; ``kernel`` is the
    layer's own choice (``QATLinear.kernel``, set from the recipe), else the process default."""
    k = kernel or _state["kernel"]
    if k == "auto":
        return device.type == "cuda"
    return k == "compile"


def forward_dtype(weight: Tensor, device_type: str) -> torch.dtype:
    """The dtype ``F.linear`` will use for the fake-quant weight: the autocast dtype when autocast
    would cast a float32 weight, else the weight's own (what ``.to(weight.dtype)`` gives)."""
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


# -- the compiled bodies (pure functions of grid.py, nothing else) ---------------------------
def _grid_dtype(w: Tensor) -> Tensor:
    return w.float() if w.dtype in (torch.float16, torch.bfloat16) else w  # grid in >= fp32


def _dynamic_fwd(w: Tensor, clip_ratio: Tensor, bits: int, symmetric: bool, group_size: int | None, out_dtype: torch.dtype, seq: bool):
    wf = _grid_dtype(w)
    scale, zero = grid.minmax_qparams_unchecked(wf, bits, group_size, symmetric, clip_ratio, seq)
    y, mask = grid.fake_quantize_masked(wf, scale, zero, bits, symmetric, group_size)
    return y.to(out_dtype), mask


def _given_fwd(w: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool, group_size: int | None, out_dtype: torch.dtype):
    y, mask = grid.fake_quantize_masked(w, scale, zero, bits, symmetric, group_size)
    return y.to(out_dtype), mask


def _ste_bwd(gy: Tensor, mask: Tensor, ref_dtype: torch.dtype, w_dtype: torch.dtype):
    g = gy.to(ref_dtype)
    return (g.view(mask.shape) * mask).view(gy.shape).to(w_dtype)


def _lsq_terms(gy: Tensor, w: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool, group_size: int | None, ref_dtype: torch.dtype):
    return grid.lsq_qparam_grad_terms(gy.to(ref_dtype), w, scale, zero, bits, symmetric, group_size)


@functools.cache
def _compiled(name: str):
    fn = {"dynamic_fwd": _dynamic_fwd, "given_fwd": _given_fwd, "ste_bwd": _ste_bwd, "lsq_terms": _lsq_terms}[name]
    return torch.compile(fn, fullgraph=True)


def _run(name: str, compiled: bool, *args):
    if compiled:  # detached: called inside an autograd.Function, whose inputs' requires_grad would only multiply the compiled variants
        return _compiled(name)(*(a.detach() if isinstance(a, Tensor) else a for a in args))
    return globals()["_" + name](*args)


# -- autograd ----------------------------------------------------------------------------------
class _DynamicFakeQuant(torch.autograd.Function):
    """Qparams from the (detached) weight's group range, fake-quant, STE: ``dy/dw = mask``."""

    @staticmethod
    def forward(ctx, w, clip_ratio, bits, symmetric, group_size, out_dtype, compiled, seq):
        y, mask = _run("dynamic_fwd", compiled, w, clip_ratio, bits, symmetric, group_size, out_dtype, seq)
        ctx.save_for_backward(mask if ctx.needs_input_grad[0] else None)
        # eager forms the grad in the grid dtype (float32 at least), then autograd casts it to w's
        ctx.ref_dtype, ctx.w_dtype, ctx.compiled = _grid_dtype(w).dtype, w.dtype, compiled
        return y

    @staticmethod
    def backward(ctx, gy):
        (mask,) = ctx.saved_tensors
        gw = _run("ste_bwd", ctx.compiled, gy, mask, ctx.ref_dtype, ctx.w_dtype) if ctx.needs_input_grad[0] else None
        return gw, None, None, None, None, None, None, None


class _GivenFakeQuant(torch.autograd.Function):
    """Fake-quant with given qparams (learnable / fixed / frozen): STE for ``w``, LSQ for them."""

    @staticmethod
    def forward(ctx, w, scale, zero, bits, symmetric, group_size, out_dtype, compiled):
        y, mask = _run("given_fwd", compiled, w, scale, zero, bits, symmetric, group_size, out_dtype)
        ctx.qparam_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.spec = (bits, symmetric, group_size)
        ctx.ref_dtype, ctx.w_dtype, ctx.compiled = torch.promote_types(w.dtype, scale.dtype), w.dtype, compiled
        ctx.save_for_backward(mask if ctx.needs_input_grad[0] else None, *((w, scale, zero) if ctx.qparam_grads else ()))
        return y

    @staticmethod
    def backward(ctx, gy):
        saved = ctx.saved_tensors  # unpacked once: activation checkpointing allows no second unpack
        mask = saved[0]
        gw = _run("ste_bwd", ctx.compiled, gy, mask, ctx.ref_dtype, ctx.ref_dtype) if ctx.needs_input_grad[0] else None
        gs = gz = None
        if ctx.qparam_grads:
            _, w, scale, zero = saved
            # the sums stay eager: a compiled reduction may add in another order (not bit-exact)
            ts, tz = _run("lsq_terms", ctx.compiled, gy, w, scale, zero, *ctx.spec, ctx.ref_dtype)
            gs = ts.sum(-1).to(scale.dtype) if ctx.needs_input_grad[1] else None
            gz = tz.sum(-1).to(zero.dtype) if ctx.needs_input_grad[2] else None
        return gw, gs, gz, None, None, None, None, None


def dynamic_fake_quant(
    w: Tensor,
    clip_ratio: Tensor,
    bits: int,
    symmetric: bool,
    group_size: int | None,
    out_dtype: torch.dtype,
    compiled: bool = True,
    seq: bool = False,
) -> Tensor:
    """``fake_quantize_ste(w, *minmax_qparams(w.detach(), ..., clip_ratio, seq), ...).to(out_dtype)``
    in one pass (the *dynamic* mode of ``QATLinear``)."""
    return _DynamicFakeQuant.apply(w, clip_ratio, bits, symmetric, group_size, out_dtype, compiled, seq)


def given_fake_quant(
    w: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool, group_size: int | None, out_dtype: torch.dtype, compiled: bool = True
) -> Tensor:
    """``fake_quantize_ste(w, scale, zero, ...).to(out_dtype)`` (learnable / fixed qparams)."""
    return _GivenFakeQuant.apply(w, scale, zero, bits, symmetric, group_size, out_dtype, compiled)
