"""GPTQ (Frantar et al., 2022, arXiv 2210.17323), on the grid of ``qat/quant/grid.py``.

Per Linear layer, with ``H = 2 X X^T / N`` over its calibration inputs (float32):

- dead inputs (``H_ii = 0``) get ``H_ii = 1`` and a zero weight column;
- dampening ``H += damp * mean(diag H) * I`` (default 1 %; raised tenfold while Cholesky fails);
- ``U = chol(H^-1)^T`` (upper), from a Cholesky factorisation and its inverse;
- columns are quantized left to right; column ``i``'s error ``(w_i - q_i) / U_ii`` is spread onto
  the columns not yet quantized through row ``i`` of ``U``. Inside a block of ``block_size``
  columns this is done at once; the rest of the matrix gets one matrix product per block ("lazy
  batch" updates);
- group qparams come from ``minmax_qparams`` (``mse_clip_ratio`` when the scheme's ``scale_init``
  is ``mse``) on the group's columns *as updated so far*, when the sweep reaches the group's first
  column (a group straddling a block boundary gets the pending updates of the current block
  first, so the result equals the one-column-at-a-time algorithm); codes come from the same
  ``fake_quantize``;
- ``act_order``: columns are visited in order of decreasing ``H_ii``. The groups must stay
  contiguous runs of input columns (that is what the scheme and the export formats store), so the
  qparams of every group are then computed up front from the original weight ("static groups")
  and each column uses the qparams of the group it belongs to.

Blocks are processed in order by ``quantize_layerwise`` (block ``i`` sees the outputs of the
quantized blocks ``< i``); inside a block the layers are quantized in call order (q/k/v, o,
gate/up, down), each group calibrated on the outputs of the layers already quantized
(``true_sequential``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..quant.grid import fake_quantize
from ..quant.scheme import QuantScheme
from .calibrate import BlockRunner, InputStats
from .experts import sequential_passes
from .install import install_quantized
from .rtn import rtn_qparams


def inverse_cholesky_upper(h: Tensor, damp: float) -> tuple[Tensor, float]:
    """``chol(H + d I)^-1`` as the upper factor ``U`` with ``U^T U = (H + d I)^-1``; ``d`` starts at
    ``damp * mean(diag H)`` and grows tenfold while the factorisation fails. Returns ``(U, damp)``."""
    n = h.shape[0]
    mean_diag = torch.diagonal(h).mean()
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    d = damp
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(h + d * mean_diag * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, d
        d *= 10
    raise RuntimeError(f"GPTQ: the Hessian is not positive definite even with dampening {d / 10:g}")


@torch.no_grad()
def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    scheme: QuantScheme,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    latent: bool = False,
) -> tuple:
    """GPTQ of one weight ``[out, in]`` given ``H`` ``[in, in]``; computed in ``weight``'s dtype
    (pass float32, or float64 for reference checks).

    Returns ``(w_hat, scale, zero, info)``: the on-grid weight, its qparams ``[out, n_groups]``
    and ``{"damp", "loss"}`` (``loss``: GPTQ's own estimate ``sum (w - q)^2 / U_ii^2 / 2``).
    With ``latent``, also the error-compensated weight each column had just before it was
    rounded (``[out, in]``): its rounding on the same qparams is ``w_hat``, and unlike ``w_hat``
    it does not sit on grid points (the start ``quant.init_from`` gives QAT)."""
    W = weight.clone()
    H = hessian.to(W.dtype).clone()
    out_f, in_f = W.shape
    g = scheme.group_size or in_f
    clip = scheme.scale_init
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = static_groups or act_order
    n_groups = in_f // g
    if static:
        scale, zero = (t.to(W.dtype) for t in rtn_qparams(W, scheme, clip))
    else:
        scale = torch.zeros(out_f, n_groups, dtype=W.dtype, device=W.device)
        zero = torch.zeros_like(scale)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U, damp_used = inverse_cholesky_upper(H, damp)
    del H
    Q = torch.zeros_like(W)
    C = torch.zeros_like(W) if latent else None
    loss = torch.zeros(out_f, dtype=W.dtype, device=W.device)
    bits, sym = scheme.bits, scheme.symmetric

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            if static:
                grp = (int(perm[col]) if perm is not None else col) // g
            else:
                grp = col // g
                if col % g == 0:  # first column of a group: qparams from its columns as updated so far
                    cols = W1[:, i : i + g]
                    if col + g > i2:  # the group runs past this block: add this block's pending updates
                        rest = W[:, i2 : col + g] - Err1[:, :i] @ U[i1:col, i2 : col + g]
                        cols = torch.cat([cols, rest], dim=1)
                    s, z = rtn_qparams(cols, scheme, clip, group_size=None)
                    scale[:, grp], zero[:, grp] = s[:, 0].to(W.dtype), z[:, 0].to(W.dtype)
            w = W1[:, i]
            d = U1[i, i]
            q = fake_quantize(w.unsqueeze(1), scale[:, grp : grp + 1], zero[:, grp : grp + 1], bits, sym, None)[:, 0]
            Q1[:, i] = q
            if C is not None:
                C[:, col] = w
            loss += (w - q).square() / d.square() / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
        C = C[:, torch.argsort(perm)] if C is not None else None
    info = {"damp": damp_used, "loss": float(loss.sum())}
    return (Q, scale, zero, info, C) if latent else (Q, scale, zero, info)


def gptq_block(runner: BlockRunner, names: list[str], plan: dict[str, QuantScheme], opts, shared_stats=None) -> dict:
    """Quantize the block's layers ``names`` with GPTQ (see module doc); returns per-layer info."""
    from tqdm.auto import tqdm

    groups = runner.linear_groups(names)
    passes = sequential_passes(groups) if opts.true_sequential else [groups]
    info = {}
    for p_groups in passes:
        stats = runner.collect(
            p_groups, lambda n: InputStats(runner.module(n).in_features, runner.device, xtx=torch.float32),
            stop_early=len(p_groups) == 1,
        )
        for name in tqdm([n for grp in p_groups for n in grp], desc=f"gptq {runner.name}", leave=False, dynamic_ncols=True):
            layer = runner.module(name)
            q, scale, zero, i, latent = gptq_quantize(
                layer.weight.detach().float(),
                stats[name].hessian(),
                plan[name],
                damp=opts.damp,
                block_size=opts.block_size,
                act_order=opts.act_order,
                static_groups=opts.static_groups,
                latent=True,
            )
            install_quantized(runner.model, name, plan[name], scale, zero, q).ptq_latent = latent.cpu()
            info[name] = i
        del stats
    return info
