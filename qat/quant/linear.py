"""The fake-quant Linear: a latent full-precision weight, quantized inside ``forward``.

Why a module swap (a subclass of ``nn.Linear`` put in place of the original) and not
``torch.nn.utils.parametrize``:

- the latent weight keeps its name ``weight``, so ``state_dict`` keys, Hugging Face
  ``save_pretrained`` / ``from_pretrained`` and PEFT's target matching see an ordinary Linear;
  a parametrization renames it to ``parametrizations.weight.original``;
- FSDP2 (``fully_shard``) all-gathers parameters in a pre-forward hook; the fake-quant runs in
  ``forward`` on the gathered weight, so sharding needs nothing special. Parametrizations run
  at attribute access and their caching interacts badly with sharded / DTensor parameters;
- the quantization parameters (scale, zero-point, clip ratio) live next to the weight as
  ordinary parameters or buffers, so optimizers, checkpoints and ``accelerator.save_state``
  handle them with no extra code;
- ``isinstance(layer, nn.Linear)`` still holds.

Three modes, chosen by the scheme and the freeze policy:

- *dynamic* (default): scale and zero-point are recomputed from the latent weight in every
  forward (min-max, times a per-group clip ratio fixed at wrap time: 1 for ``minmax``, the
  searched ratio for ``mse``); gradients reach the weight through the STE.
- *learnable* (``scheme.learnable``): ``weight_scale`` and ``weight_zero_point`` are parameters
  initialised from the scheme's ``scale_init`` and trained with LSQ gradients.
- *fixed* (``set_qparams()``, used by PTQ): the qparams are given buffers and the weight is
  snapped onto their grid; forward fake-quantizes with them.
- *frozen* (``freeze()``): fixed at the current qparams, and nothing receives gradients; the
  layer stays bit-identical afterwards.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused
from .grid import (
    check_finite,
    dequantize,
    fake_quantize,
    fake_quantize_activation,
    fake_quantize_ste,
    lsq_grad_factor,
    minmax_qparams,
    mse_clip_ratio,
    on_grid,
    positive,
    quantize,
    round_ste,
    scale_grad,
)
from .scheme import QuantScheme


@dataclass
class QuantizedWeight:
    """What export needs: integer codes and the qparams that map them back to weights."""

    codes: Tensor  # int32 [out, in]
    scale: Tensor  # [out, n_groups]
    zero_point: Tensor  # [out, n_groups], integer-valued (0 when symmetric), (2^b - 1) / 2 on SEQ's grid
    scheme: QuantScheme

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, self.scheme.group_size, dtype)


class QATLinear(nn.Linear):
    quant_enabled = True  # False: forward is the plain Linear (fixed/frozen layers stay on their grid)
    kernel: str | None = None  # fake-quant implementation (fused.KERNELS); None: the process default
    recompute = True  # quant.recompute: the quantized weight recomputed in backward (False: kept, as F.linear keeps it)

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme, **kw):
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.scheme = scheme
        self.frozen = False
        self.fixed = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, name: str = "", ratio: Tensor | None = None, search: bool = True) -> "QATLinear":
        """Wrap ``linear`` (sharing its weight and bias tensors) and initialise the qparams
        (``ratio``, ``search``: see ``_init_qparams``)."""
        scheme.check_layer(name or "linear", linear.in_features)
        check_finite(linear.weight.detach(), f"{name or 'linear'}.weight")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.scheme = scheme
        new.frozen = False
        new.fixed = False
        new._init_qparams(ratio, search)
        return new

    # -- qparams -------------------------------------------------------------------------
    def _init_qparams(self, ratio: Tensor | None = None, search: bool = True) -> None:
        """The qparams from the weight and a per-group clip ratio: ``ratio`` when given (the MSE
        search run elsewhere: ``qat.policy.search``), else the scheme's ``scale_init`` (the MSE
        search here, or 1); ``search=False`` skips the search (1: a resume or a structure whose
        qparams are loaded next)."""
        s = self.scheme
        w = self.weight.detach().float()
        if ratio is None:
            if s.scale_init == "mse" and search and not w.is_meta:
                ratio = mse_clip_ratio(w, s.bits, s.group_size, s.symmetric, seq=s.seq)
            else:
                ratio = torch.ones(group_count(self), device=w.device)
        ratio = ratio.to(w.device)
        if s.learnable:
            scale, zero = minmax_qparams(w, s.bits, s.group_size, s.symmetric, ratio, s.seq)
            # float32 masters whatever the weight's dtype: a bf16 scale would not take an LSQ step
            # of less than 1/256 of itself; the forward uses them cast to the weight's dtype
            self.weight_scale = nn.Parameter(scale.float())
            # trained on an asymmetric integer grid; fixed at 0 (symmetric) or (2^b - 1) / 2 (SEQ)
            self.weight_zero_point = nn.Parameter(zero.float(), requires_grad=s.trains_zero_point)
        else:
            self.register_buffer("clip_ratio", ratio)

    def qparams(self) -> tuple[Tensor, Tensor]:
        """Current (scale, zero_point); differentiable in learnable mode."""
        s = self.scheme
        if self.fixed:
            return self.weight_scale, self.weight_zero_point
        if s.learnable:  # the float32 masters, floored, in the weight's dtype (a differentiable cast)
            scale = positive(self.weight_scale).to(self.weight.dtype)
            if s.lsq_grad_scale:
                scale = scale_grad(scale, lsq_grad_factor(s.group_size or self.in_features, s.bits, s.symmetric))
            if not s.trains_zero_point:
                return scale, self.weight_zero_point.to(self.weight.dtype)
            return scale, round_ste(self.weight_zero_point.to(self.weight.dtype)).clamp(s.qmin, s.qmax)
        w = self.weight.detach()
        if w.dtype in (torch.float16, torch.bfloat16):
            w = w.float()  # the grid is computed in at least fp32
        return minmax_qparams(w, s.bits, s.group_size, s.symmetric, self.clip_ratio, s.seq)

    # -- forward -------------------------------------------------------------------------
    def fake_quantized_weight(self) -> Tensor:
        s = self.scheme
        scale, zero = self.qparams()
        w = fake_quantize_ste(self.weight, scale, zero, s.bits, s.symmetric, s.group_size)
        return w.to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not self.quant_enabled and not self.fixed:  # quant.start_step: a plain Linear until then
            return F.linear(x, self.weight, self.bias)
        if self.scheme.act_bits is not None:
            x = fake_quantize_activation(x, self.scheme.act_bits)
        if not self.recompute:
            return F.linear(x, self.forward_weight(x.device.type), self.bias)
        params = [p for n, p in self._parameters.items() if p is not None and p.requires_grad and n != "bias"]
        return _RecomputedLinear.apply(x, self.bias, self, x.device.type, *params)

    def forward_weight(self, device_type: str) -> Tensor:
        """The weight the forward computes with: the latent one before ``quant.start_step``, else
        its fake-quant (the fused kernels where ``quant.kernel`` picks them)."""
        if not self.quant_enabled and not self.fixed:  # quant.start_step: a plain Linear until then
            return self.weight
        if fused.use_fused(self.weight.device, self.kernel) and type(self).fake_quantized_weight is QATLinear.fake_quantized_weight:
            return self.fused_fake_quantized_weight(device_type)
        return self.fake_quantized_weight()

    def fused_fake_quantized_weight(self, device_type: str, compiled: bool = True) -> Tensor:
        """``fake_quantized_weight()`` as F.linear will consume it (autocast dtype under mixed
        precision), through the fused kernels of ``fused.py``; the same values bit for bit."""
        s = self.scheme
        out_dtype = fused.forward_dtype(self.weight, device_type)
        if not (self.fixed or s.learnable):
            return fused.dynamic_fake_quant(self.weight, self.clip_ratio, s.bits, s.symmetric, s.group_size, out_dtype, compiled, s.seq)
        scale, zero = self.qparams()
        return fused.given_fake_quant(self.weight, scale, zero, s.bits, s.symmetric, s.group_size, out_dtype, compiled)

    # -- export --------------------------------------------------------------------------
    @torch.no_grad()
    def quantized_weight(self, dtype: torch.dtype | None = None, param_dtype: torch.dtype | None = None) -> QuantizedWeight:
        """Integer codes + qparams. With ``dtype``, the scale is rounded to it first (the codes
        are kept), so ``dequantize(dtype)`` is exactly what a kernel computes from a checkpoint
        whose scales are stored in ``dtype``. ``param_dtype``: the forward saw the parameters cast
        to it (FSDP2's mixed precision casts parameters, not buffers), so the codes are those
        of the cast parameters: what was trained is what is written."""
        if param_dtype is not None:
            return self.with_params_in(param_dtype).quantized_weight(dtype)
        s = self.scheme
        scale, zero = (t.detach() for t in self.qparams())
        codes = quantize(self.weight.detach().to(scale.dtype), scale, zero, s.bits, s.symmetric, s.group_size)
        if dtype is not None:
            scale, zero = scale.to(dtype), zero.to(dtype)
        return QuantizedWeight(codes, scale, zero, s)

    @torch.no_grad()
    def written_weight(self, dtype: torch.dtype | None = None, param_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(weight, scale, zero_point)`` as ``final/`` stores them: ``quantized_weight(dtype,
        param_dtype)`` dequantized in ``dtype`` (default: the weight's), with its qparams, bit
        for bit, computed without the int32 codes (``grid.on_grid``)."""
        if param_dtype is not None:
            return self.with_params_in(param_dtype).written_weight(dtype)
        s = self.scheme
        scale, zero = (t.detach() for t in self.qparams())
        stored = (scale.to(dtype), zero.to(dtype)) if dtype is not None else (scale, zero)
        w = on_grid(self.weight.detach().to(scale.dtype), scale, zero, s.bits, s.symmetric, s.group_size, *stored, dtype or self.weight.dtype)
        return (w, *stored)

    def with_params_in(self, dtype: torch.dtype) -> "QATLinear":
        """A shallow copy whose parameters are detached copies cast to ``dtype`` (buffers shared)."""
        new = copy.copy(self)
        new._parameters = {k: None if v is None else nn.Parameter(v.detach().to(dtype), requires_grad=False) for k, v in self._parameters.items()}
        return new

    @torch.no_grad()
    def on_grid_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dequantized weight (what forward uses), in ``dtype`` (default: the weight's)."""
        return self.quantized_weight(dtype).dequantize(dtype or self.weight.dtype)

    # -- fixing and freezing ------------------------------------------------------------
    @torch.no_grad()
    def set_qparams(self, scale: Tensor, zero_point: Tensor, weight: Tensor | None = None) -> None:
        """Fix the qparams (mode *fixed*; PTQ results use this) and snap the weight (``weight``
        if given, else the current latent one) onto their grid. Forward keeps fake-quantizing
        with these qparams; the weight may still train (through the STE) unless frozen."""
        s = self.scheme
        if weight is not None:
            self.weight.data.copy_(weight)
        scale, zero_point = scale.detach().clone(), zero_point.detach().clone()
        snapped = fake_quantize(self.weight.detach().to(scale.dtype), scale, zero_point, s.bits, s.symmetric, s.group_size)
        self.weight.data.copy_(snapped)
        for name in ("weight_scale", "weight_zero_point", "clip_ratio"):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        self.fixed = True

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix this layer at its quantized value: weight := on-grid weight, qparams fixed,
        no gradients for weight, bias or qparams."""
        if self.frozen:
            return
        if not self.fixed:
            self.set_qparams(*self.qparams())
        # drop stale gradients too: an optimizer steps every parameter whose .grad is not None
        # (zero_grad(set_to_none=False) keeps a zero tensor), so AdamW momentum / weight decay
        # would otherwise keep moving the frozen weight off its grid
        self.weight.requires_grad_(False)
        self.weight.grad = None
        if self.bias is not None:
            self.bias.requires_grad_(False)
            self.bias.grad = None
        self.frozen = True

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_repr()}"

    def quant_repr(self) -> str:
        s = self.scheme
        group = "channel" if s.group_size is None else f"g{s.group_size}"
        mode = "frozen" if self.frozen else "fixed" if self.fixed else "learnable" if s.learnable else "dynamic"
        sym = "seq" if s.seq else "sym" if s.symmetric else "asym"
        act = f", a{s.act_bits}" if s.act_bits else ""
        return f"w{s.bits} {group} {sym} {mode}{act}"


class _RecomputedLinear(torch.autograd.Function):
    """``F.linear(x, layer.forward_weight(), bias)`` keeping for backward what ``nn.Linear`` keeps
    (its input; the parameters are the layer's own tensors) and nothing weight-sized: the
    fake-quantized weight, its STE mask and its LSQ terms are recomputed from the parameters in
    backward, through the same functions, so the gradients are those of the direct graph.

    ``params``: the layer's parameters the weight depends on that take gradients (the latent
    weight, learnable qparams, LoRA factors), passed so that autograd routes their gradients
    (and FSDP / DDP hooks) as for any input. Under autocast ``F.linear`` casts as it would; the
    backward computes in the dtype the forward produced."""

    @staticmethod
    def forward(ctx, x, bias, layer, device_type, *params):
        with torch.no_grad():
            wq = layer.forward_weight(device_type)
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        x_c = x.to(ctx.autocast[1]) if ctx.autocast[0] else x  # the input as F.linear computes with it (autocast's cast)
        y = F.linear(x_c, wq, bias)
        ctx.layer, ctx.device_type, ctx.out_dtype = layer, device_type, y.dtype
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(x_c, *params)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, *params = ctx.saved_tensors
        cd = ctx.out_dtype
        need_x, need_b, _, _, *need_p = ctx.needs_input_grad
        enabled, dtype = ctx.autocast  # the forward's autocast state: the same weight, in the same dtype
        with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
            wq = ctx.layer.forward_weight(ctx.device_type)
        wq_c = wq.detach().to(cd)
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = (gy @ wq_c).to(ctx.dtypes[0]) if need_x else None
        gb = g2.sum(0).to(ctx.dtypes[1]) if need_b else None
        grads = [None] * len(params)
        wanted = [i for i, n in enumerate(need_p) if n]
        if wanted:
            gwq = (g2.t() @ x.reshape(-1, x.shape[-1]).to(cd)).to(wq.dtype)
            got = torch.autograd.grad(wq, [params[i] for i in wanted], gwq, allow_unused=True)
            for i, g in zip(wanted, got):
                grads[i] = g
        return gx, gb, None, None, *grads


def group_count(layer: QATLinear) -> tuple[int, ...]:
    """The shape of the layer's qparams: ``[out, n_groups]`` (``[experts, out, n_groups]`` for a
    fused expert tensor)."""
    g = layer.scheme.group_size or layer.in_features
    return (*layer.weight.shape[:-1], layer.in_features // g)
