"""The analyses behind ``qat analyze`` (the command line is ``qat.cli.analyze``): layer
sensitivity with a suggested freeze policy, and the CVXQ bit allocation written as a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from ..io.models import DTYPES
from ..recipe import Recipe, RecipeError, validate
from .bitalloc import allocate, base_scheme_bits, distortion, export_bytes, layer_stats, overrides_for
from .sensitivity import analyze, freeze_snippet, heatmap_png, table_md
from .setup import load_setup


def out_dir(out: str | None, recipe: Recipe, suffix: str) -> Path:
    """``out``, or ``<output_dir>-<suffix>`` beside the recipe's run."""
    path = Path(out) if out else Path(f"{str(recipe.output_dir).rstrip('/')}-{suffix}")
    if path.exists() and not path.is_dir():
        raise RecipeError(f"--out: {path} exists and is not a directory")
    return path


def sensitivity_report(recipe: Recipe, recipe_file: str, out: Path, batches: int, batch_size: int, valid_tokens: int | None,
                       device: str | None, per_depth: bool, rank_by: str, freeze_top: int) -> tuple[dict, str, bool]:
    """Run the sensitivity analysis and write ``sensitivity.{json,md,png}`` and ``freeze.yaml``;
    returns ``(result, title, whether the PNG was written)``."""
    if recipe.quant is None:
        raise RecipeError("quant: the analysis needs a quant section (the scheme to quantize to)")
    if freeze_top < 1:
        raise RecipeError(f"--freeze-top: must be at least 1 (got {freeze_top})")
    setup = load_setup(recipe, batches * batch_size, valid_tokens, device)
    result = analyze(setup, batch_size, per_depth=per_depth, rank_by=rank_by)
    q = recipe.quant
    scheme = f"W{q.bits} {'per-channel' if q.group_size is None else f'g{q.group_size}'} {'sym' if q.symmetric else 'asym'}"
    title = f"sensitivity of {recipe.model.path} at {scheme}"
    result.update(recipe=str(recipe_file), model=recipe.model.path, scheme=scheme)
    snippet = freeze_snippet(result, freeze_top)
    validate({**recipe.to_dict(), **yaml.safe_load(snippet)})  # a valid freeze section of this very recipe, checked before writing
    result["freeze_snippet"] = snippet
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity.json").write_text(json.dumps(result, indent=1))
    (out / "sensitivity.md").write_text(table_md(result, title) + "\n## Suggested freeze policy\n\n```yaml\n" + snippet + "```\n")
    (out / "freeze.yaml").write_text(snippet)
    png = heatmap_png(result, out / "sensitivity.png", title)
    return result, title, png


def allocation_recipe(recipe, bits_by_layer: dict[str, int], plan, avg_bits: float):
    """The recipe with ``quant.bits`` / ``quant.overrides`` set to the allocation (validated)."""
    n_by_layer = {n: 1 for n in bits_by_layer}  # most layers, not most parameters: fewer overrides
    base = base_scheme_bits(bits_by_layer, n_by_layer)
    q = recipe.quant
    overrides = overrides_for(bits_by_layer, plan, base, q.group_size, q.symmetric)
    data = recipe.to_dict()
    # the keys the recipe left null stay null: resolved by the new widths, not kept at the old one's
    data["quant"] = {**q.as_given(), "bits": base, "overrides": overrides}
    if recipe.freeze._by_default:
        data["freeze"] = {**data["freeze"], "policy": None}
    data["output_dir"] = f"{str(recipe.output_dir).rstrip('/')}-cvxq{avg_bits:g}"
    return validate(data), {"bits": base, "overrides": overrides}


def bits_report(recipe: Recipe, recipe_file: str, out: Path, avg_bits: float, choices: tuple[int, ...], granularity: str,
                batches: int, batch_size: int, device: str | None) -> dict:
    """CVXQ allocation for ``avg_bits``; writes ``allocation.json``, ``overrides.yaml`` and
    ``recipe.yaml`` into ``out`` and returns the allocation (``layers``, ``uniform`` included)."""
    if recipe.quant is None:
        raise RecipeError("quant: the allocation needs a quant section (group size, targets)")
    if not choices[0] <= avg_bits <= choices[-1]:
        raise RecipeError(f"--avg-bits: must lie within the supported widths [{choices[0]}, {choices[-1]}] (got {avg_bits})")
    setup = load_setup(recipe, batches * batch_size, 1, device)
    print(f"bits: gradients of the FP model over {setup.calib.n_tokens} calibration tokens, {len(setup.plan)} layers")
    stats = layer_stats(setup, batch_size)
    d = np.array([s["g2"] * s["s2"] for s in stats])
    n = np.array([s["n_params"] for s in stats], dtype=float)
    alloc = allocate(d, n, avg_bits, choices)
    bits_by_layer = {s["name"]: int(b) for s, b in zip(stats, alloc.bits)}
    new_recipe, quant_snippet = allocation_recipe(recipe, bits_by_layer, setup.plan, avg_bits)
    scale_bytes = DTYPES[setup.save_dtype].itemsize
    layers = []
    for s, b, bc, bl in zip(stats, alloc.bits, alloc.continuous, alloc.lagrangian_bits):
        sch = setup.plan[s["name"]]
        layers.append({**s, "d": s["g2"] * s["s2"], "continuous_bits": float(bc), "lagrangian_bits": int(bl), "bits": int(b),
                       "export_bytes": export_bytes(tuple(s["shape"]), int(b), sch.group_size, sch.symmetric, scale_bytes)})
    result = {
        "recipe": str(recipe_file),
        "model": recipe.model.path,
        "avg_bits_target": avg_bits,
        "choices": list(choices),
        "granularity": granularity,
        "avg_bits": alloc.avg_bits,
        "budget_code_bits": alloc.budget_bits,
        "used_code_bits": float(np.dot(alloc.bits, n)),
        "lambda": alloc.lam,
        "rounding": alloc.rounding,
        "distortion": alloc.distortion,
        "distortion_uniform": {int(b): distortion(d, n, np.full(len(d), b)) for b in choices},
        "g2_estimator": "mean over calibration micro-batches of mean_jl (dL_k/dW_jl)^2, L_k = mean next-token CE of the FP model",
        "s2_estimator": "mean over quantization groups of the biased variance of the group's weights",
        "budget_basis": "parameter-weighted average of the integer code bits; scales/zero-points not counted (same for every choice)",
        "calib_tokens": setup.calib.n_tokens,
        "export_bytes_expected": sum(r["export_bytes"] for r in layers),
        "export_scale_bytes": scale_bytes,
        "quant": quant_snippet,
        "recipe_out": new_recipe.output_dir,
        "layers": layers,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "allocation.json").write_text(json.dumps(result, indent=1))
    (out / "overrides.yaml").write_text(
        f"# CVXQ allocation: average {alloc.avg_bits:.4f} code bits per weight (target {avg_bits}), choices {list(choices)}\n"
        + yaml.safe_dump({"quant": quant_snippet}, sort_keys=False)
    )
    (out / "recipe.yaml").write_text(new_recipe.to_yaml())
    return result


def bits_table(layers: list[dict]) -> str:
    types = list(dict.fromkeys(r["type"] for r in layers))
    depths = sorted({r["depth"] for r in layers})
    cell = {(r["type"], r["depth"]): r["bits"] for r in layers}
    lines = ["type \\ depth " + " ".join(f"{d:>3}" for d in depths)]
    for t in types:
        lines.append(f"{t:<13}" + " ".join(f"{cell.get((t, d), '-'):>3}" for d in depths))
    return "\n".join(lines)
