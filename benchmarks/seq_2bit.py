"""ParetoQ's stretched elastic quantizer (SEQ) at 2 bits, as an experiment: ``qat train`` with the
2-bit asymmetric, learnable layers on SEQ's grid.

SEQ (Liu et al. 2025, "ParetoQ", arXiv 2502.02631) puts the four 2-bit levels symmetrically around
zero with no zero level: ``(q - 1.5) * s`` for codes ``q`` in 0..3, i.e. levels
``{-1.5, -0.5, 0.5, 1.5} * s``. On qat's grid (``w = (q - z) * s``) that is the asymmetric 2-bit
grid with the zero-point fixed at 1.5, a half-integer that the integer zero-points of
compressed-tensors / GPTQ checkpoints cannot hold; so it is not a recipe option, only this
experiment. Every fake-quant path goes through ``grid.py``, whose math takes a fractional
zero-point as it is; here the zero-point is a fixed buffer (not rounded, not trained) and the
scale is learnable (LSQ), initialised by a per-group search of the clip ratio on the weight error.

    python benchmarks/seq_2bit.py RECIPE [dotted.key=value ...]   # same arguments as `qat train`;
                                                                  # needs quant.bits=2, asymmetric, learnable
"""

from __future__ import annotations

import sys

import torch

from qat.cli import main
from qat.quant import linear as qlinear
from qat.quant.grid import fake_quantize, group_view, positive

ZERO = 1.5
_init, _qparams = qlinear.QATLinear._init_qparams, qlinear.QATLinear.qparams


def _seq(layer) -> bool:
    s = layer.scheme
    return s.bits == 2 and not s.symmetric and s.learnable and not layer.fixed


@torch.no_grad()
def seq_scale(w: torch.Tensor, group_size: int | None, ratios=torch.linspace(0.3, 1.0, 29)) -> torch.Tensor:
    """Per group: the scale ``r * max|w| / 1.5`` (outer level at ``r`` of the group's range) with
    the smallest squared weight error over ``ratios``."""
    wg = group_view(w.float(), group_size)  # [out, groups, g]
    amax = wg.abs().amax(-1).clamp_min(1e-8)
    best_s, best_e = None, None
    for r in ratios.tolist():
        s = r * amax / ZERO
        z = torch.full_like(s, ZERO)
        err = (group_view(fake_quantize(w.float(), s, z, 2, False, group_size), group_size) - wg).pow(2).sum(-1)
        if best_s is None:
            best_s, best_e = s, err
        else:
            better = err < best_e
            best_s, best_e = torch.where(better, s, best_s), torch.where(better, err, best_e)
    return best_s


def init_qparams(self) -> None:
    _init(self)
    if _seq(self):
        self.weight_scale.data.copy_(seq_scale(self.weight.detach(), self.scheme.group_size).to(self.weight_scale.dtype))
        zero = torch.full_like(self.weight_scale, ZERO)
        del self.weight_zero_point
        self.register_buffer("weight_zero_point", zero)


def qparams(self):
    if _seq(self):
        return positive(self.weight_scale), self.weight_zero_point
    return _qparams(self)


if __name__ == "__main__":
    qlinear.QATLinear._init_qparams = init_qparams
    qlinear.QATLinear.qparams = qparams
    sys.exit(main(["train", *sys.argv[1:]]))
