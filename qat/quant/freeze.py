"""Freeze policies: which layers are fixed at their quantized values while the rest trains.

``ov-freeze`` ("Oh! We Freeze", Bhalgat et al., arXiv 2403.18159): the attention value and
output projections are the layers whose quantization error hurts most; they are set to their
quantized values and receive no updates. The default patterns use Llama naming (``v_proj``,
``o_proj``, also Mistral / Qwen2); pass ``patterns`` for other families (OPT: ``v_proj``,
``out_proj``). ``custom`` freezes the layers matching the given regexes.
"""

from __future__ import annotations

import re

from torch import nn

from .linear import QATLinear
from .scheme import QuantConfigError

POLICIES = ("none", "ov-freeze", "custom")
OV_PATTERNS: tuple[str, ...] = (r"\.v_proj$", r"\.o_proj$")


def apply_freeze(
    model: nn.Module, policy: str = "none", patterns: list[str] | tuple[str, ...] | None = None, scales: bool = True
) -> list[str]:
    """Freeze the matching Linear layers in place and return their names.

    A ``QATLinear`` is snapped to its grid (``QATLinear.freeze``); a plain Linear (no
    quantization) just stops receiving gradients. Every pattern must match at least one Linear.
    ``scales=False``: only the weight (and bias) of a ``QATLinear`` stop training, its latent
    weight kept as is; learnable qparams keep training (LSQ), so its quantized value still moves.
    """
    if policy not in POLICIES:
        raise QuantConfigError(f"freeze policy must be one of {POLICIES}, got {policy!r}")
    if policy == "none":
        if patterns:
            raise QuantConfigError("freeze.patterns given with policy 'none'")
        return []
    if policy == "custom" and not patterns:
        raise QuantConfigError("freeze policy 'custom' needs a non-empty list of patterns")
    regs = []
    for p in patterns or OV_PATTERNS:
        try:
            regs.append(re.compile(p))
        except re.error as e:
            raise QuantConfigError(f"freeze policy {policy!r}: invalid regex {p!r}: {e}") from None
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for r in regs:
        if not any(r.search(n) for n, _ in linears):
            raise QuantConfigError(
                f"freeze policy {policy!r}: pattern {r.pattern!r} matches no Linear layer of the model"
            )
    frozen = []
    for name, layer in linears:
        if any(r.search(name) for r in regs):
            if isinstance(layer, QATLinear) and scales:
                layer.freeze()
            else:
                for p in (layer.weight, layer.bias) if isinstance(layer, QATLinear) else layer.parameters():
                    if p is not None:
                        p.requires_grad_(False)
                        p.grad = None  # a stale (even zero) grad would still let AdamW move it
            frozen.append(name)
    return frozen
