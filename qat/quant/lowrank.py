"""Low-rank correction of a quantization error (QERA, arXiv 2410.06040): pure float64 math, shared
by the QERA PTQ baseline and the LoRA-QAT initialisation."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def sqrt_and_inv_sqrt(r: Tensor, damp: float = 1e-6) -> tuple[Tensor, Tensor, bool]:
    """Symmetric ``R^(1/2)`` and ``R^(-1/2)`` of a PSD matrix (float64), regularised when singular.
    Returns ``(sqrt, inv_sqrt, regularised)``."""
    r = r.double()
    r = (r + r.T) / 2
    evals, evecs = torch.linalg.eigh(r)
    delta = damp * torch.diagonal(r).mean().clamp(min=torch.finfo(torch.float64).tiny)
    regularised = bool(evals.min() <= delta)
    if regularised:
        evals = evals.clamp(min=0) + delta
    root = evals.sqrt()
    return (evecs * root) @ evecs.T, (evecs / root) @ evecs.T, regularised


@torch.no_grad()
def lowrank_factors(
    err: Tensor, rank: int, r: Tensor | None = None, diag: Tensor | None = None, damp: float = 1e-6
) -> tuple[Tensor, Tensor, dict]:
    """Rank-``rank`` factors ``(A [k, in], B [out, k])`` with ``B A`` minimising the output error of
    the weight error ``err`` ``[out, in]`` under ``R`` (full: QERA-exact), ``diag`` (its diagonal:
    QERA-approx) or neither (identity: plain SVD). Float64 throughout."""
    e = err.double()
    info = {"regularised": False}
    if r is not None:
        root, inv_root, info["regularised"] = sqrt_and_inv_sqrt(r, damp)
        m = e @ root
    elif diag is not None:
        d = diag.double()
        delta = damp * d.mean().clamp(min=torch.finfo(torch.float64).tiny)
        if bool((d <= delta).any()):
            d = d.clamp(min=0) + delta
            info["regularised"] = True
        root_d = d.sqrt()
        m = e * root_d
    else:
        m = e
    k = min(rank, *e.shape)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    sk = s[:k].sqrt()
    b = u[:, :k] * sk
    a = sk.unsqueeze(1) * vh[:k]
    if r is not None:
        a = a @ inv_root
    elif diag is not None:
        a = a / root_d
    info["rank"] = k
    return a, b, info
