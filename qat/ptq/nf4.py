"""``nf4``: the bitsandbytes 4-bit NormalFloat baseline (QLoRA's storage format), blocksize 64.

Each planned layer's weight is quantized with ``bitsandbytes.functional.quantize_4bit(quant_type=
"nf4", blocksize=64)`` (absmax per block of 64 consecutive weights of the flattened matrix, 16
fixed NF4 levels) and replaced by a plain ``nn.Linear`` holding the dequantized weight. This is
*not* qat's integer grid: ``final/`` is a fake (dequantized) model, ``qat_quant.json`` lists no
integer layers and carries an ``nf4`` entry saying so, and ``qat export`` cannot pack it. Data-free.
Storage: 4 bits per weight + one absmax per 64 weights (fp32 in bitsandbytes: 4.5 bits/weight;
4.127 with its double quantization).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..deps import require
from ..io.final import add_quant_note

BLOCKSIZE = 64
NOTE = (
    "bitsandbytes NF4 (blocksize 64): weights are dequantized NF4 values, NOT on qat's integer grid; "
    "no codes/qparams are stored and qat export cannot pack this model"
)


@torch.no_grad()
def nf4_roundtrip(w: torch.Tensor, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """``dequantize_4bit(quantize_4bit(w, nf4, blocksize))`` in ``w``'s dtype and device."""
    F = require("bitsandbytes.functional", "qat ptq --method nf4")
    src = w.detach()
    work = src if src.dtype in (torch.float32, torch.float16, torch.bfloat16) else src.float()
    q, state = F.quantize_4bit(work.contiguous(), blocksize=blocksize, quant_type="nf4")
    return F.dequantize_4bit(q, state, blocksize=blocksize, quant_type="nf4").reshape(src.shape).to(src.dtype)


@torch.no_grad()
def quantize_nf4(model: nn.Module, names, device=None) -> list[str]:
    """Replace each named Linear's weight by its NF4 round trip (in place); returns the names."""
    done = []
    for n in names:
        layer = model.get_submodule(n)
        w = layer.weight.detach()
        dev = torch.device(device) if device is not None else w.device
        layer.weight.data.copy_(nf4_roundtrip(w.to(dev)).to(w.device))
        done.append(n)
    return done


def annotate_final(final_dir: Path, names: list[str]) -> None:
    """Add the ``nf4`` entry (the note, blocksize and layers) to ``final/qat_quant.json``."""

    add_quant_note(final_dir, "nf4", {"note": NOTE, "quant_type": "nf4", "blocksize": BLOCKSIZE, "on_qat_grid": False, "layers": sorted(names)})
