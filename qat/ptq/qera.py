"""QERA (Zhang et al., 2024, arXiv 2410.06040): the low-rank correction of the quantization error
that minimises the layer's *output* error.

For a layer ``y = x W^T`` (``W`` ``[out, in]``) quantized to ``W~`` with error ``E = W - W~``, the
rank-``k`` ``C`` minimising ``E_x ||x (E - C)^T||^2 = tr((E - C) R (E - C)^T)``, ``R = E[x^T x]``,
is ``C = SVD_k(E R^(1/2)) R^(-1/2)`` — in the paper's ``[in, out]`` layout
``C_k = R^(-1/2) SVD_k(R^(1/2) (W - W~))``.

- ``qera-exact``: ``R`` accumulated in float64 over the calibration tokens, its symmetric square
  root and inverse square root from one float64 eigendecomposition. If ``R`` is singular (its
  smallest eigenvalue is at most ``damp * mean(diag R)``, e.g. fewer tokens than channels or a
  dead channel), ``R + damp * mean(diag R) * I`` is used instead.
- ``qera-approx``: ``R`` replaced by its diagonal ``E[x_i^2]``: ``C = SVD_k(E S) S^-1``, ``S =
  diag(sqrt(E[x_i^2]))`` (dead channels get the same regularisation).
- ``R = I`` gives the plain weight SVD of the error (what the test compares against).

The correction is stored as LoRA factors: ``B = U_k S_k^(1/2)`` ``[out, k]``, ``A = S_k^(1/2)
V_k^T R^(-1/2)`` ``[k, in]``, so ``B A = C`` and PEFT (``lora_alpha = r``, scaling 1) adds
``x A^T B^T``. The base ``W~`` is RTN (min-max, or ``mse`` clip per the scheme) or GPTQ, on the
same grid, computed from the same statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..quant.grid import fake_quantize
from ..quant.lowrank import lowrank_factors
from ..quant.scheme import QuantScheme
from .calibrate import BlockRunner, InputStats, attach_lowrank
from .install import install_quantized
from .gptq import gptq_quantize
from .rtn import rtn_qparams


def qera_block(runner: BlockRunner, names: list[str], plan: dict[str, QuantScheme], opts, exact: bool, gptq_opts) -> dict[str, tuple[Tensor, Tensor]]:
    """QERA for the block's layers, in call order; the corrected layers (base + LoRA hook) feed
    the later ones. Returns ``{name: (A, B)}`` (float32)."""
    from tqdm.auto import tqdm

    need_full = exact or opts.base == "gptq"
    out = {}
    for group in runner.linear_groups(names):
        stats = runner.collect(
            [group],
            lambda n: InputStats(
                runner.module(n).in_features,
                runner.device,
                xtx=torch.float64 if need_full else None,
                sq_sum=not need_full,
            ),
        )
        for name in tqdm(group, desc=f"qera {runner.name}", leave=False, dynamic_ncols=True):
            layer = runner.module(name)
            scheme = plan[name]
            w = layer.weight.detach()
            st = stats[name]
            if opts.base == "gptq":
                q, scale, zero, _ = gptq_quantize(
                    w.float(), st.hessian(), scheme, gptq_opts.damp, gptq_opts.block_size, gptq_opts.act_order, gptq_opts.static_groups
                )
            else:
                scale, zero = rtn_qparams(w, scheme, scheme.scale_init)
                q = fake_quantize(w.float(), scale, zero, scheme.bits, scheme.symmetric, scheme.group_size)
            if exact:
                a, b, _ = lowrank_factors(w.double() - q.double(), opts.rank, r=st.second_moment(), damp=opts.damp)
            else:
                a, b, _ = lowrank_factors(w.double() - q.double(), opts.rank, diag=st.mean_sq(), damp=opts.damp)
            new = install_quantized(runner.model, name, scheme, scale, zero, q)
            attach_lowrank(new, a.float(), b.float())
            out[name] = (a.float().cpu(), b.float().cpu())
        del stats
    return out
