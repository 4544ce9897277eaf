"""Fused MoE experts, fake-quantized expert by expert like a Linear.

In transformers 5 the experts of an MoE block are not ``nn.Linear`` layers but 3-D parameters of
one module: ``gate_up_proj [experts, 2 * intermediate, hidden]`` and ``down_proj [experts,
hidden, intermediate]`` (each ``[out, in]`` per expert), read by whichever experts
implementation the config picks (an eager loop indexing one expert at a time, ``batched_mm``
gathering per token, ``grouped_mm`` passing the whole tensor).

``QATExpertWeight`` is a ``QATLinear`` whose weight is such a 3-D tensor: the grid functions work
on the last two dimensions, so every expert is quantized row by row with groups along its input
dimension, with the same modes (dynamic, learnable / LSQ, fixed, frozen) and the same code as a
Linear. It takes the parameter's place and name (``...experts.gate_up_proj`` becomes a module
whose ``weight`` is the parameter), and the experts module's class is swapped for a subclass
whose ``forward`` puts the fake-quantized tensor where the implementation reads the parameter
(the instance ``__dict__``, which attribute lookup consults before ``nn.Module``'s registries)
for the duration of the call. Optimizers, checkpoints and FSDP2 see an ordinary parameter.
With ``quant.recompute`` (the default) that call is checkpointed (``torch.utils.checkpoint``):
backward runs it again rather than keep the fake-quantized tensors, so the experts keep for
backward what their inputs are, nothing the size of their weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .grid import check_finite
from .linear import QATLinear
from .scheme import QuantConfigError, QuantScheme


class QATExpertWeight(QATLinear):
    """The fused weight ``[experts, out, in]`` of an experts module, fake-quantized per expert.
    ``in_features`` / ``out_features`` are one expert's; ``num_experts`` the leading dimension."""

    num_experts: int

    @classmethod
    def from_param(cls, param: nn.Parameter, scheme: QuantScheme, name: str, ratio: Tensor | None = None, search: bool = True) -> "QATExpertWeight":
        check_expert_scheme(scheme, name, param.shape[-1])
        check_finite(param.detach(), name)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_experts, new.out_features, new.in_features = param.shape
        new.weight = param
        new.register_parameter("bias", None)
        new.scheme = scheme
        new.frozen = False
        new.fixed = False
        new._init_qparams(ratio, search)
        return new

    def forward(self, x: Tensor) -> Tensor:
        raise TypeError("a fused expert tensor is read by its experts module (forward_weight), not called")

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, {self.quant_repr()}"


def check_expert_scheme(scheme: QuantScheme, name: str, in_features: int) -> None:
    scheme.check_layer(name, in_features)
    if scheme.act_bits is not None:
        raise QuantConfigError(
            f"layer {name!r}: act_bits applies to Linear layers; fused experts take weight quantization only "
            "(add a quant.overrides entry for the experts with act_bits: null)"
        )


def expert_tensors(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{name: (experts module, parameter name)}`` for every 3-D weight of a transformers experts
    module (one made by ``use_experts_implementation``, which records its layout) not yet wrapped
    (``name`` is the parameter's qualified name). Other 3-D weights (a Mamba mixer's conv1d, a
    remote-code MoE) are not candidates: the build summary lists them in full precision."""
    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, QATLinear) or not hasattr(m, "is_transposed"):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.ndim == 3:
                out[f"{mname}.{pname}" if mname else pname] = (m, pname)
    return out


def check_layout(module: nn.Module, name: str) -> None:
    """Refuse the layout the per-expert grid would quantize along the wrong dimension."""
    if module.is_transposed:
        raise QuantConfigError(
            f"layer {name!r}: this model stores its experts transposed ([experts, in, out], as gpt-oss does); "
            "qat quantizes [experts, out, in] expert tensors: add 'experts\\.' to quant.ignore"
        )


_CLASSES: dict[type, type] = {}


def _qat_experts_class(base: type) -> type:
    if base not in _CLASSES:

        def quantized_forward(self, *args, **kwargs):
            quants = [(n, m) for n, m in self._modules.items() if isinstance(m, QATExpertWeight)]
            device_type = quants[0][1].weight.device.type
            for n, q in quants:
                self.__dict__[n] = q.forward_weight(device_type)
            try:
                return base.forward(self, *args, **kwargs)
            finally:
                for n, _ in quants:
                    self.__dict__.pop(n, None)

        def forward(self, *args, **kwargs):
            quants = [m for m in self._modules.values() if isinstance(m, QATExpertWeight)]
            if torch.is_grad_enabled() and any(q.recompute and q.weight.requires_grad for q in quants):
                # quant.recompute: the fake-quantized tensors (each the size of the experts' weights)
                # are rebuilt in backward with the experts' forward instead of kept for it
                return checkpoint(quantized_forward, self, *args, use_reentrant=False, **kwargs)
            return quantized_forward(self, *args, **kwargs)

        _CLASSES[base] = type(f"QAT{base.__name__}", (base,), {"forward": forward, "qat_base": base, "__module__": __name__})
    return _CLASSES[base]


def wrap_expert_tensor(module: nn.Module, pname: str, scheme: QuantScheme, name: str, ratio: Tensor | None = None,
                       search: bool = True) -> QATExpertWeight:
    """Put a ``QATExpertWeight`` in place of ``module.<pname>`` (sharing the parameter)."""
    q = QATExpertWeight.from_param(module._parameters[pname], scheme, name, ratio, search)
    del module._parameters[pname]
    module.add_module(pname, q)
    if not hasattr(type(module), "qat_base"):
        module.__class__ = _qat_experts_class(type(module))
    return q


def unwrap_expert_tensor(module: nn.Module, pname: str, weight: Tensor) -> None:
    """Put a plain parameter holding ``weight`` (or ``weight`` itself, a parameter) back in place
    of the ``QATExpertWeight`` ``module.<pname>``, and the experts module's own class once none is
    left."""
    del module._modules[pname]
    module.register_parameter(pname, weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False))
    if not any(isinstance(m, QATExpertWeight) for m in module._modules.values()) and hasattr(type(module), "qat_base"):
        module.__class__ = type(module).qat_base
