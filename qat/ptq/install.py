"""Installing a PTQ result: a layer's fixed qparams, its weight snapped onto their grid."""

from __future__ import annotations

from torch import Tensor, nn

from ..quant.experts import wrap_expert_tensor
from ..quant.linear import QATLinear
from ..quant.scheme import QuantScheme


def install_quantized(
    model: nn.Module, name: str, scheme: QuantScheme, scale: Tensor, zero: Tensor, weight: Tensor | None = None
) -> QATLinear:
    """Replace Linear ``name`` by a ``QATLinear`` with these fixed qparams, its weight (``weight`` if
    given) snapped onto their grid."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = getattr(parent, attr)
    if isinstance(layer, nn.Parameter):  # a fused expert tensor [experts, out, in]
        layer = wrap_expert_tensor(parent, attr, QuantScheme(scheme.bits, scheme.group_size, scheme.symmetric, "minmax", grid=scheme.grid), name)
        layer.scheme = scheme
    elif not isinstance(layer, QATLinear):
        layer = QATLinear.from_linear(layer, QuantScheme(scheme.bits, scheme.group_size, scheme.symmetric, "minmax", grid=scheme.grid), name)
        layer.scheme = scheme
        setattr(parent, attr, layer)
    layer.set_qparams(scale.to(layer.weight.device), zero.to(layer.weight.device), None if weight is None else weight.to(layer.weight))
    return layer
