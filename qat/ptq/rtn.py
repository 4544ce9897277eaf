"""Round-to-nearest: per-group min-max qparams, optionally with the ``mse`` clip search.

Data-free: every layer is quantized on its own, with the grid of ``qat/quant/grid.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..quant.apply import planned_weight
from ..quant.grid import fake_quantize, minmax_qparams, mse_clip_ratio
from ..quant.scheme import QuantScheme
from .install import install_quantized


@torch.no_grad()
def rtn_qparams(w: Tensor, scheme: QuantScheme, clip: str = "minmax", group_size: int | None = -1) -> tuple[Tensor, Tensor]:
    """Scale and zero-point of ``w`` (``[out, in]``, in at least float32) per (row, group).

    ``clip="mse"``: each group's range is shrunk by the ratio in ``[0.5, 1]`` (``[0.3, 1]`` on SEQ's
    grid) that minimises the group's squared weight error (``mse_clip_ratio``). ``group_size=-1``: the scheme's."""
    g = scheme.group_size if group_size == -1 else group_size
    if w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()  # the grid is computed in at least float32
    ratio = mse_clip_ratio(w, scheme.bits, g, scheme.symmetric, seq=scheme.seq) if clip == "mse" else None
    return minmax_qparams(w, scheme.bits, g, scheme.symmetric, ratio, scheme.seq)


@torch.no_grad()
def rtn_weight(w: Tensor, scheme: QuantScheme, clip: str = "minmax") -> tuple[Tensor, Tensor, Tensor]:
    """``(w_hat, scale, zero)``: the on-grid weight (float32) and its qparams."""
    scale, zero = rtn_qparams(w, scheme, clip)
    return fake_quantize(w.float(), scale, zero, scheme.bits, scheme.symmetric, scheme.group_size), scale, zero


@torch.no_grad()
def quantize_rtn(model: nn.Module, plan: dict[str, QuantScheme], clip: str = "minmax", names=None, device=None) -> None:
    """RTN for the planned layers (all, or ``names``), in place."""
    from tqdm.auto import tqdm

    for name in tqdm(list(names if names is not None else plan), desc=f"rtn ({clip})", leave=False, dynamic_ncols=True):
        w = planned_weight(model, name).detach()
        if device is not None:
            w = w.to(device)
        scale, zero = rtn_qparams(w, plan[name], clip)
        install_quantized(model, name, plan[name], scale, zero)
