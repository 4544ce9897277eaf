"""Which layer types are fragile under quantization: the signal-propagation analysis of "Oh! We
Freeze" (Bhalgat et al., arXiv 2403.18159), per layer type (q, k, v, o, gate, up, down) and depth.

For the recipe's scheme and a few calibration batches (the first blocks the QAT run visits):

- gradients: ``g`` = the gradient of the mean next-token cross-entropy over the calibration
  batches w.r.t. each layer's (latent) weight, with the full-precision model (``fp``), with only
  that layer's *type* fake-quantized (``only``: every depth of the type, min-max qparams, STE), and
  with every planned layer fake-quantized (``all``: the setting of QAT itself). Reported per layer:
  ``||g_only|| / ||g_fp||``, ``||g_all|| / ||g_fp||`` and the relative gradient error
  ``||g_only - g_fp|| / ||g_fp||``;
- local error: ``||X W^T - X W_hat^T|| / ||X W^T||`` on held-out validation tokens, ``X`` the
  full-precision inputs of the layer (``qat/evaluate/diagnostic.py``);
- global loss: the change in mean validation NLL (nats/token) when only that type is quantized
  (and, unless switched off, when only that one layer at that depth is).

Types are ranked by one of these type means (``RANK_KEYS``; default ``grad_ratio_all``, the
gradient-norm amplification under fake-quant that the paper's signal-propagation argument is
about), the most fragile first; the top ones make the suggested
``freeze: {policy: custom, patterns: [...]}``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..deps import available
from ..evaluate.diagnostic import layer_output_errors, mean_error
from ..quant.apply import fake_quantized, planned_weight
from . import RANK_KEYS
from .setup import layer_depth, layer_type, mean_nll, quantized, squared_grads

RANK_WHAT = {
    "grad_ratio_all": "||grad W|| with every layer fake-quantized / FP, mean over depth",
    "grad_ratio_only": "||grad W|| with only this type fake-quantized / FP, mean over depth",
    "grad_error_only": "relative gradient error with only this type fake-quantized, mean over depth",
    "delta_nll": "validation NLL increase when only this type is quantized",
    "delta_nll_per_mparam": "validation NLL increase when only this type is quantized, per million parameters",
    "output_error": "relative layer output error, mean over depth",
}


def grouped_by_type(names: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for n in names:
        out[layer_type(n)].append(n)
    return dict(out)


@torch.no_grad()
def quantized_weights(model, plan, names) -> dict[str, torch.Tensor]:
    """The on-grid weight (fp32) each named layer has when fake-quantized with its plan scheme."""
    with fake_quantized(model, {n: plan[n] for n in names}) as layers:
        return {n: layer.on_grid_weight(torch.float32) for n, layer in layers.items()}


def _norm(t: torch.Tensor) -> float:
    return float(t.double().norm())


def gradient_effects(model, plan, groups: dict[str, list[str]], calib, batch_size: int) -> dict:
    """Per layer: gradient norms with nothing quantized, with only its group quantized, with every
    layer in ``groups`` quantized; and the calibration losses of those settings."""
    names = [n for ns in groups.values() for n in ns]
    fp = squared_grads(model, names, calib, batch_size, keep_grads=True)
    with quantized(model, plan, names):
        full = squared_grads(model, names, calib, batch_size, keep_grads=True)
    layers = {}
    losses = {"fp": fp["loss"], "all": full["loss"], "only": {}}
    for key, members in groups.items():
        with quantized(model, plan, members):
            only = squared_grads(model, members, calib, batch_size, keep_grads=True)
        losses["only"][key] = only["loss"]
        for n in members:
            g_fp, g_q, g_all = fp["grads"][n], only["grads"][n], full["grads"][n]
            base = _norm(g_fp)
            layers[n] = {
                "grad_norm_fp": base,
                "grad_norm_only": _norm(g_q),
                "grad_norm_all": _norm(g_all),
                "grad_ratio_only": _norm(g_q) / base if base > 0 else float("nan"),
                "grad_ratio_all": _norm(g_all) / base if base > 0 else float("nan"),
                "grad_error_only": _norm(g_q - g_fp) / base if base > 0 else float("nan"),
            }
    return {"layers": layers, "calib_loss": losses, "batches": fp["batches"]}


def loss_effects(model, plan, groups: dict[str, list[str]], valid, batch_size: int) -> tuple[float, dict[str, float]]:
    """``(fp NLL, {group: NLL with only that group quantized - fp NLL})`` on ``valid``."""
    base = mean_nll(model, valid, batch_size)
    out = {}
    for key, members in groups.items():
        with quantized(model, plan, members):
            out[key] = mean_nll(model, valid, batch_size) - base
    return base, out


def analyze(setup, batch_size: int, per_depth: bool = True, rank_by: str = "grad_ratio_all", progress=print) -> dict:
    """Every measurement of the module doc on ``setup`` (``qat.analyze.setup.load_setup``)."""

    model, plan = setup.model, setup.plan
    names = list(plan)
    by_type = grouped_by_type(names)
    progress(f"sensitivity: {len(names)} layers, types {', '.join(by_type)}; gradients on {setup.calib.n_tokens} calibration tokens")
    grads = gradient_effects(model, plan, by_type, setup.calib, batch_size)
    progress(f"sensitivity: layer output errors and NLL on {setup.valid.n_tokens} tokens of the {setup.valid_what}")
    errors = layer_output_errors(model, {"q": quantized_weights(model, plan, names)}, setup.valid, batch_size, desc=None)["q"]
    fp_nll, d_type = loss_effects(model, plan, by_type, setup.valid, batch_size)
    _, all_nll = loss_effects(model, plan, {"all": names}, setup.valid, batch_size)
    d_layer = {}
    if per_depth:
        progress(f"sensitivity: NLL with one layer quantized at a time ({len(names)} evaluations)")
        _, d_layer = loss_effects(model, plan, {n: [n] for n in names}, setup.valid, batch_size)
    layers = []
    for n in names:
        w = planned_weight(model, n)
        s = plan[n]
        row = {
            "name": n,
            "type": layer_type(n),
            "depth": layer_depth(n),
            "n_params": int(w.numel()),
            "bits": s.bits,
            "group_size": s.group_size,
            "output_error": errors.get(n, float("nan")),  # nan: a fused expert tensor (no module of its own to hook)
            **grads["layers"][n],
        }
        if per_depth:
            row["delta_nll_layer"] = d_layer[n]
        layers.append(row)
    types = {}
    for t, members in by_type.items():
        rows = [r for r in layers if r["type"] == t]
        n_params = sum(r["n_params"] for r in rows)
        types[t] = {
            "layers": len(rows),
            "n_params": n_params,
            "delta_nll": d_type[t],
            "delta_nll_per_mparam": d_type[t] / (n_params / 1e6),
            "calib_loss_only": grads["calib_loss"]["only"][t],
            "output_error_mean": mean_error({r["name"]: r["output_error"] for r in rows}),  # nan (experts) left out
            "grad_ratio_only_mean": sum(r["grad_ratio_only"] for r in rows) / len(rows),
            "grad_ratio_all_mean": sum(r["grad_ratio_all"] for r in rows) / len(rows),
            "grad_error_only_mean": sum(r["grad_error_only"] for r in rows) / len(rows),
        }
    field = RANK_KEYS[rank_by]
    ranking = sorted(types, key=lambda t: -types[t][field])
    return {
        "fp_nll": fp_nll,
        "all_quantized_delta_nll": all_nll["all"],
        "calib_loss": grads["calib_loss"],
        "calib_tokens": setup.calib.n_tokens,
        "calib_batches": grads["batches"],
        "valid_tokens": setup.valid.n_tokens,
        "valid_data": setup.valid_what,
        "types": types,
        "layers": layers,
        "ranking": ranking,
        "rank_by": rank_by,
    }


# -- outputs ----------------------------------------------------------------------------------
def freeze_patterns(ranking: list[str], top: int) -> list[str]:
    return [rf"\.{t}$" for t in ranking[:top]]


def cut_margin(result: dict, top: int) -> dict | None:
    """How sure the cut between the ``top``-th and the next type of the ranking is: the per-layer
    values of the ranking quantity of the two types, paired by depth (same depth, same inputs),
    their mean difference and its standard error over the depths. ``settled`` is False when the
    difference is within 2 standard errors (or there are fewer than 2 depths): the data does
    not say which of the two is more fragile. None when there is no next type or no per-layer value
    (``delta_nll`` is a type-level quantity)."""
    ranking, key = result["ranking"], result["rank_by"]
    per_layer = key if key != "delta_nll" else None
    if top <= 0 or top >= len(ranking) or per_layer is None:
        return None
    a, b = ranking[top - 1], ranking[top]
    va = {r["depth"]: r[per_layer] for r in result["layers"] if r["type"] == a}
    vb = {r["depth"]: r[per_layer] for r in result["layers"] if r["type"] == b}
    diffs = [va[d] - vb[d] for d in sorted(va.keys() & vb.keys())]
    n = len(diffs)
    mean = sum(diffs) / n if n else float("nan")
    se = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1) / n) if n > 1 else float("inf")
    return {"last_in": a, "first_out": b, "diff": mean, "stderr": se, "depths": n, "settled": n > 1 and abs(mean) > 2 * se}


def freeze_snippet(result: dict, top: int) -> str:
    """A ``freeze:`` section (YAML) freezing the ``top`` most fragile types, with the ranking and
    the margin of the cut (``cut_margin``) as comments."""
    import yaml

    types, key = result["types"], result["rank_by"]
    lines = [f"# layer types by fragility, most fragile first: {RANK_WHAT[key]}"]
    for i, t in enumerate(result["ranking"], 1):
        s = types[t]
        lines.append(f"#   {i}. {t}: {s[RANK_KEYS[key]]:.4g} (validation NLL {s['delta_nll']:+.4f} when only {t} is quantized)")
    m = cut_margin(result, top)
    if m is not None:
        verdict = (
            "a clear margin" if m["settled"]
            else "WITHIN NOISE: this data does not say which of the two is more fragile; check with QAT runs (freeze one, then the other)"
        )
        lines.append(
            f"# margin of the cut, {m['last_in']} (frozen) over {m['first_out']} (not): {m['diff']:+.4g} "
            f"± {m['stderr']:.2g} (paired by depth, {m['depths']} depths, 1 standard error): {verdict}"
        )
    section = {"freeze": {"policy": "custom", "patterns": freeze_patterns(result["ranking"], top)}}
    return "\n".join(lines) + "\n" + yaml.safe_dump(section, sort_keys=False, default_flow_style=None)


def _f(v, spec=".4f") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def depth_grid(result: dict, key: str) -> tuple[list[str], list[int], list[list[float]]]:
    """``(types, depths, values[type][depth])`` of a per-layer quantity (nan where absent)."""
    types = list(result["types"])
    depths = sorted({r["depth"] for r in result["layers"]})
    grid = [[float("nan")] * len(depths) for _ in types]
    for r in result["layers"]:
        if key in r:
            grid[types.index(r["type"])][depths.index(r["depth"])] = r[key]
    return types, depths, grid


PER_LAYER = (
    ("output_error", "relative output error ||X(W - W_hat)^T|| / ||XW^T||"),
    ("grad_ratio_only", "||grad W|| with only this type fake-quantized / FP"),
    ("grad_error_only", "||grad_q - grad_fp|| / ||grad_fp|| (only this type quantized)"),
    ("grad_ratio_all", "||grad W|| with every layer fake-quantized / FP"),
    ("delta_nll_layer", "validation NLL change with only this one layer quantized"),
)


def table_md(result: dict, title: str) -> str:
    types = result["types"]
    out = [
        f"# {title}",
        "",
        f"FP validation NLL {result['fp_nll']:.4f} on {result['valid_tokens']} tokens ({result['valid_data']}); "
        f"every layer quantized: +{result['all_quantized_delta_nll']:.4f}. Gradients over {result['calib_batches']} "
        f"calibration batches ({result['calib_tokens']} tokens).",
        "",
        f"Ranked by {RANK_WHAT[result['rank_by']]}.",
        "",
        "| rank | type | layers | params | ΔNLL (only this type) | ΔNLL / M params | output error | grad ratio (only) | grad error (only) | grad ratio (all) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, t in enumerate(result["ranking"], 1):
        s = types[t]
        out.append(
            f"| {i} | {t} | {s['layers']} | {s['n_params']:,} | {_f(s['delta_nll'])} | {_f(s['delta_nll_per_mparam'])} | "
            f"{_f(s['output_error_mean'])} | {_f(s['grad_ratio_only_mean'], '.3f')} | {_f(s['grad_error_only_mean'], '.3f')} | "
            f"{_f(s['grad_ratio_all_mean'], '.3f')} |"
        )
    for key, what in PER_LAYER:
        if not any(key in r for r in result["layers"]):
            continue
        tnames, depths, grid = depth_grid(result, key)
        out += ["", f"## {what}, by depth", "", "| type | " + " | ".join(str(d) for d in depths) + " |", "|---|" + "---|" * len(depths)]
        for t, row in zip(tnames, grid):
            out.append(f"| {t} | " + " | ".join(_f(v) for v in row) + " |")
    return "\n".join(out) + "\n"


def heatmap_png(result: dict, path, title: str) -> bool:
    """Types x depth heatmaps of the per-layer quantities; ``False`` when matplotlib is missing."""
    if not available("matplotlib"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [(k, w) for k, w in PER_LAYER if any(k in r for r in result["layers"])]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys) + 1, 3.6))
    for ax, (key, what) in zip(np.atleast_1d(axes), keys):
        types, depths, grid = depth_grid(result, key)
        arr = np.array(grid)
        im = ax.imshow(arr, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(depths)), [str(d) for d in depths])
        ax.set_yticks(range(len(types)), types)
        ax.set_xlabel("depth")
        ax.set_title(what, fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
        if arr.size <= 64:
            for (i, j), v in np.ndenumerate(arr):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6, color="w")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
