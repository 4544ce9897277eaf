"""CVXQ bit allocation (Young, arXiv 2409.02026), per layer.

Model of the loss increase caused by quantizing layer ``i`` (``n_i`` weights) to ``B_i`` bits:

    D_i(B_i) = n_i * G_i^2 * S_i^2 * 2^(-2 B_i)

- ``G_i^2``: the mean squared gradient of the calibration loss w.r.t. the layer's weights,
  ``mean_k mean_jl (dL_k / dW_jl)^2`` over K calibration micro-batches (``L_k`` = mean next-token
  cross-entropy of micro-batch k under the full-precision model; ``setup.squared_grads``);
- ``S_i^2``: the weight variance, averaged over the layer's quantization groups (per row for
  per-channel schemes): ``mean_groups var(w in group)``.

Problem: minimise ``sum_i D_i(B_i)`` subject to ``sum_i n_i B_i <= avg_bits * sum_i n_i`` with
``B_i`` in the supported set. The budget counts the integer codes only (parameter-weighted
average bits of the codes); the scales (and zero-points) cost the same for every bit choice at a
fixed group size, so they do not change the allocation; ``export_bytes`` adds them for the size.

Solver (``allocate``):

1. dual ascent on ``lambda`` by bisection in log space: for a given lambda each layer takes
   ``argmin_b d_i 4^-b + lambda b`` over the supported set (the discrete counterpart of
   ``B = 1/2 log2(2 ln2 d_i / lambda)`` clipped to the set; CVXQ's ``1/2 log2(G^2 S^2 /
   lambda)`` with the constant ``2 ln 2`` folded into lambda). The bits used are non-increasing in
   lambda; the smallest feasible lambda is kept. Each such Lagrangian solution is exactly optimal
   for the budget it uses;
2. rounding to the budget: the Lagrangian solutions only reach the budgets at lambda's
   breakpoints, so the discrete problem is then solved exactly as a multiple-choice knapsack by
   dynamic programming over the budget in units of ``gcd(n_i)`` (layers x units x choices steps:
   ~10^5 for llama-small, ~2x10^7 for a 7B Llama), starting from nothing, so its optimum is never
   worse than the Lagrangian point. Where that table would be too large (``MAX_DP_CELLS``) the
   leftover budget is instead filled greedily, one step up the set at a time, by the best
   distortion decrease per extra bit among the steps that still fit (not always optimal).

Everything here is pure (numpy / floats): the statistics come from ``layer_stats``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..quant.grid import group_view
from .setup import exact_pattern, layer_depth, layer_type, squared_grads

DEFAULT_CHOICES = (2, 3, 4, 8)
MAX_DP_CELLS = 5 * 10**7  # layers x budget units x choices of the exact rounding step


@dataclass
class Allocation:
    bits: np.ndarray  # int, per layer
    lam: float  # the dual variable of the Lagrangian step
    avg_bits: float  # parameter-weighted average of the code bits
    budget_bits: float  # avg target x parameters
    distortion: float  # sum n d 4^-b
    continuous: np.ndarray  # 1/2 log2(2 ln2 d / lam), unclipped, for the record
    lagrangian_bits: np.ndarray  # the allocation before the rounding step
    rounding: str  # "knapsack" (exact) or "greedy"


def choose_bits(d: np.ndarray, lam: float, choices=DEFAULT_CHOICES) -> np.ndarray:
    """Per layer ``argmin_b d 4^-b + lam b`` over ``choices`` (ties: fewer bits)."""
    c = np.asarray(sorted(choices), dtype=float)
    cost = np.asarray(d, dtype=float)[:, None] * 4.0 ** -c[None, :] + lam * c[None, :]
    return c[np.argmin(cost, axis=1)].astype(int)


def used_bits(bits: np.ndarray, n: np.ndarray) -> float:
    return float(np.dot(np.asarray(bits, dtype=float), np.asarray(n, dtype=float)))


def distortion(d: np.ndarray, n: np.ndarray, bits: np.ndarray) -> float:
    return float(np.sum(np.asarray(n, float) * np.asarray(d, float) * 4.0 ** -np.asarray(bits, float)))


def continuous_bits(d: np.ndarray, lam: float) -> np.ndarray:
    """The unconstrained minimiser of ``d 4^-B + lam B``: ``1/2 log2(2 ln2 d / lam)``."""
    return 0.5 * np.log2(2 * math.log(2) * np.asarray(d, float) / lam)


def solve_continuous(d: np.ndarray, n: np.ndarray, avg_bits: float, lo: float = 0.0, hi: float = 16.0, iters: int = 200) -> np.ndarray:
    """Real-valued CVXQ: ``B(lambda) = clip(1/2 log2(2 ln2 d / lambda), lo, hi)`` with lambda
    bisected so that ``sum n B = avg_bits sum n``."""
    d, n = np.asarray(d, float), np.asarray(n, float)
    target = avg_bits * n.sum()
    a, b = math.log(d.min()) - 60, math.log(d.max()) + 60  # log lambda bracket
    for _ in range(iters):
        mid = (a + b) / 2
        if np.dot(np.clip(continuous_bits(d, math.exp(mid)), lo, hi), n) > target:
            a = mid
        else:
            b = mid
    return np.clip(continuous_bits(d, math.exp(b)), lo, hi)


def allocate(d, n, avg_bits: float, choices=DEFAULT_CHOICES, iters: int = 200) -> Allocation:
    """Bits per layer minimising ``sum n d 4^-b`` with ``sum n b <= avg_bits sum n`` (see module doc)."""
    d = np.asarray(d, dtype=float)
    n = np.asarray(n, dtype=float)
    choices = tuple(sorted(set(int(c) for c in choices)))
    if d.ndim != 1 or d.shape != n.shape or len(d) == 0:
        raise ValueError("d and n must be non-empty vectors of the same length")
    if not (np.all(np.isfinite(d)) and np.all(d >= 0) and np.all(n > 0)):
        raise ValueError("d must be finite and >= 0, n > 0")
    d = np.maximum(d, np.finfo(float).tiny)  # a layer with zero gradient still needs some bits
    budget = avg_bits * n.sum()
    if choices[0] * n.sum() > budget + 1e-9 * budget:
        raise ValueError(f"--avg-bits {avg_bits}: below the smallest supported width {choices[0]}")
    if choices[-1] <= avg_bits:
        bits = np.full(len(d), choices[-1])
        return Allocation(bits, 0.0, float(choices[-1]), budget, distortion(d, n, bits), continuous_bits(d, 1e-300), bits.copy(), "none")
    # bisection on log lambda: lo -> every layer at the top (infeasible), hi -> every layer at the bottom
    lo = math.log(d.min()) + math.log(4.0 ** -choices[-1]) - 20
    hi = math.log(d.max()) + 20
    for _ in range(iters):
        mid = (lo + hi) / 2
        if used_bits(choose_bits(d, math.exp(mid), choices), n) > budget:
            lo = mid
        else:
            hi = mid
    lam = math.exp(hi)
    bits = choose_bits(d, lam, choices)
    lagrangian = bits.copy()
    exact = knapsack_bits(d, n, budget, choices)
    if exact is not None:
        bits, how = exact, "knapsack"
    else:
        bits, how = fill_budget(bits, d, n, budget, choices), "greedy"
    return Allocation(bits, lam, used_bits(bits, n) / n.sum(), budget, distortion(d, n, bits), continuous_bits(d, lam), lagrangian, how)


def knapsack_bits(d: np.ndarray, n: np.ndarray, budget: float, choices=DEFAULT_CHOICES) -> np.ndarray | None:
    """The exact minimiser of ``sum n d 4^-b`` under ``sum n b <= budget`` (multiple-choice knapsack,
    dynamic programming over the budget in units of ``gcd(n)``); ``None`` when ``n`` is not
    integral or the table would exceed ``MAX_DP_CELLS``."""
    if not np.all(n == np.round(n)):
        return None
    ni = n.astype(np.int64)
    unit = int(np.gcd.reduce(ni))
    units = int(math.floor(budget / unit + 1e-9))
    if len(n) * (units + 1) * len(choices) > MAX_DP_CELLS:
        return None
    c = np.asarray(choices, dtype=np.int64)
    best = np.full(units + 1, np.inf)  # best[u]: least distortion of the layers so far using exactly u units
    best[0] = 0.0
    picks = np.zeros((len(n), units + 1), dtype=np.int8)
    for i in range(len(n)):
        new = np.full(units + 1, np.inf)
        for j, b in enumerate(c):
            cost = int(b * ni[i] // unit)
            if cost > units:
                continue
            cand = np.full(units + 1, np.inf)
            cand[cost:] = best[: units + 1 - cost] + n[i] * d[i] * 4.0 ** -float(b)
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = j
        best = new
    u = int(np.argmin(best))
    if not np.isfinite(best[u]):
        return None
    bits = np.zeros(len(n), dtype=int)
    for i in range(len(n) - 1, -1, -1):
        bits[i] = c[picks[i, u]]
        u -= int(bits[i] * ni[i] // unit)
    return bits


def fill_budget(bits: np.ndarray, d: np.ndarray, n: np.ndarray, budget: float, choices=DEFAULT_CHOICES) -> np.ndarray:
    """Greedy rounding: raise one layer one step in ``choices`` at a time (the best distortion
    decrease per extra bit among the steps that fit in the budget left) until none fits."""
    bits = np.asarray(bits).copy()
    up = {c: choices[i + 1] for i, c in enumerate(choices[:-1])}
    left = budget - used_bits(bits, n)
    while True:
        best, best_rate = None, -1.0
        for i, b in enumerate(bits):
            nb = up.get(int(b))
            if nb is None:
                continue
            cost = n[i] * (nb - b)
            if cost > left * (1 + 1e-12):
                continue
            rate = d[i] * (4.0**-b - 4.0**-nb) / (nb - b)
            if rate > best_rate:
                best, best_rate = i, rate
        if best is None:
            return bits
        nb = up[int(bits[best])]
        left -= n[best] * (nb - bits[best])
        bits[best] = nb


# -- statistics and outputs ----------------------------------------------------------------------
def weight_variance(w, group_size: int | None) -> float:
    """``mean over quantization groups of var(w in group)`` (biased variance, fp64)."""

    wg = group_view(w.detach().double(), group_size)
    return float(wg.var(dim=-1, unbiased=False).mean())


def layer_stats(setup, batch_size: int) -> list[dict]:
    """``[{name, type, depth, shape, n_params, g2, s2}]`` for every layer of the plan."""

    names = list(setup.plan)
    grads = squared_grads(setup.model, names, setup.calib, batch_size)
    out = []
    for name in names:
        w = setup.model.get_submodule(name).weight
        out.append(
            {
                "name": name,
                "type": layer_type(name),
                "depth": layer_depth(name),
                "shape": list(w.shape),
                "n_params": int(w.numel()),
                "g2": grads["sq"][name],
                "s2": weight_variance(w, setup.plan[name].group_size),
            }
        )
    return out


def base_scheme_bits(bits_by_layer: dict[str, int], n_by_layer: dict[str, int]) -> int:
    """The bit width covering the most parameters (it becomes ``quant.bits``)."""
    weight = Counter()
    for name, b in bits_by_layer.items():
        weight[b] += n_by_layer[name]
    return max(weight.items(), key=lambda kv: (kv[1], -kv[0]))[0]


def overrides_for(bits_by_layer: dict[str, int], plan: dict, base_bits: int, base_group: int | None, base_symmetric: bool) -> list[dict]:
    """``quant.overrides`` entries (anchored exact layer names) for every layer whose scheme is not
    the base one; group size / symmetry are carried over from the plan where they differ."""

    out = []
    for name, b in bits_by_layer.items():
        s = plan[name]
        entry = {"pattern": exact_pattern(name)}
        if b != base_bits:
            entry["bits"] = int(b)
        if s.group_size != base_group:
            entry.update({"per_channel": True} if s.group_size is None else {"group_size": s.group_size})
        if s.symmetric != base_symmetric:
            entry["symmetric"] = s.symmetric
        if len(entry) > 1:
            out.append(entry)
    return out


def export_bytes(shape: tuple[int, int], bits: int, group_size: int | None, symmetric: bool, scale_bytes: int) -> int:
    """Tensor bytes compressed-tensors 0.20 ``pack-quantized`` stores for one layer: ``weight_packed``
    int32 ``[out, ceil(in * bits / 32)]`` (dense packing), ``weight_scale`` ``[out, groups]``,
    ``weight_shape`` int64 ``[2]``, and for asymmetric schemes ``weight_zero_point`` packed along
    the output dim, int32 ``[ceil(out * bits / 32), groups]``."""
    out_f, in_f = shape
    groups = in_f // (group_size or in_f)
    total = out_f * math.ceil(in_f * bits / 32) * 4 + out_f * groups * scale_bytes + 2 * 8
    if not symmetric:
        total += math.ceil(out_f * bits / 32) * groups * 4
    return total
