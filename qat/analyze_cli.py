"""``qat analyze``: analyses of a recipe's model before (or instead of) training it.

- ``qat analyze sensitivity RECIPE [dotted.key=value ...] [--batches N] [--batch-size B]
  [--valid-tokens T] [--no-per-depth] [--freeze-top K] [--out DIR]``: per layer type and depth,
  gradient norms under fake-quant vs FP, the layer's relative output error and the validation NLL
  change when only that type (or layer) is quantized ("Oh! We Freeze"). Writes
  ``sensitivity.{json,md,png}`` and ``freeze.yaml``, a ``freeze:`` section ranking the types.
- ``qat analyze bits RECIPE --avg-bits 3.0 [--bits 2,3,4,8] [--granularity layer] [...]``: CVXQ
  bit allocation (arXiv 2409.02026) for that parameter-weighted average of code bits. Writes
  ``allocation.json``, ``overrides.yaml`` (the ``quant:`` bits + ``overrides`` to paste) and
  ``recipe.yaml`` (the recipe with the allocation, output_dir ``<output_dir>-cvxq<avg>``), which
  ``qat ptq`` and ``qat train`` take as they are.

Both take a normal training recipe: its model, quant scheme (targets, ignore, overrides: group
sizes and symmetry are kept), training data (calibration: the first blocks the QAT run visits)
and validation data. Default output directory: ``<output_dir>-sensitivity`` / ``<output_dir>-bits<avg>``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .recipe import RecipeError


def _out_dir(args, recipe, suffix: str) -> Path:
    out = Path(args.out) if args.out else Path(f"{str(recipe.output_dir).rstrip('/')}-{suffix}")
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out: {out} exists and is not a directory")
    return out


def _check_counts(args) -> None:
    for flag in ("batches", "batch_size", "valid_tokens"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise RecipeError(f"--{flag.replace('_', '-')}: must be a positive integer (got {v})")


def run_sensitivity(args) -> int:
    from .analyze.sensitivity import analyze, freeze_snippet, heatmap_png, table_md
    from .analyze.setup import load_setup
    from .recipe import load_recipe, validate

    recipe = load_recipe(args.recipe, args.overrides)
    _check_counts(args)
    if recipe.quant is None:
        raise RecipeError("quant: the analysis needs a quant section (the scheme to quantize to)")
    if args.freeze_top < 1:
        raise RecipeError(f"--freeze-top: must be at least 1 (got {args.freeze_top})")
    out = _out_dir(args, recipe, "sensitivity")
    setup = load_setup(recipe, args.batches * args.batch_size, args.valid_tokens, args.device)
    result = analyze(setup, args.batch_size, per_depth=not args.no_per_depth, rank_by=args.rank_by)
    q = recipe.quant
    scheme = f"W{q.bits} {'per-channel' if q.group_size is None else f'g{q.group_size}'} {'sym' if q.symmetric else 'asym'}"
    title = f"sensitivity of {recipe.model.path} at {scheme}"
    result.update(recipe=str(args.recipe), model=recipe.model.path, scheme=scheme)
    snippet = freeze_snippet(result, args.freeze_top)
    # the snippet is a valid freeze section of this very recipe (checked before anything is written)
    import yaml

    validate({**recipe.to_dict(), **yaml.safe_load(snippet)})
    result["freeze_snippet"] = snippet
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity.json").write_text(json.dumps(result, indent=1))
    (out / "sensitivity.md").write_text(table_md(result, title) + "\n## Suggested freeze policy\n\n```yaml\n" + snippet + "```\n")
    (out / "freeze.yaml").write_text(snippet)
    png = heatmap_png(result, out / "sensitivity.png", title)
    print(table_md(result, title).split("\n## ")[0])
    print(snippet)
    print(f"wrote {out}/sensitivity.json, sensitivity.md, freeze.yaml" + (", sensitivity.png" if png else " (no PNG: pip install 'qat[plot]')"))
    return 0


def parse_bits(text: str) -> tuple[int, ...]:
    from .quant.scheme import SUPPORTED_BITS

    try:
        bits = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise RecipeError(f"--bits: expected comma-separated integers like 2,3,4,8 (got {text!r})") from None
    bad = [b for b in bits if b not in SUPPORTED_BITS]
    if not bits or bad:
        raise RecipeError(f"--bits: each width must be one of {list(SUPPORTED_BITS)} (got {text!r})")
    return bits


def allocation_recipe(recipe, bits_by_layer: dict[str, int], plan, avg_bits: float):
    """The recipe with ``quant.bits`` / ``quant.overrides`` set to the allocation (validated)."""
    from .analyze.bitalloc import base_scheme_bits, overrides_for
    from .recipe import validate

    n_by_layer = {n: 1 for n in bits_by_layer}  # most layers, not most parameters: fewer overrides
    base = base_scheme_bits(bits_by_layer, n_by_layer)
    q = recipe.quant
    overrides = overrides_for(bits_by_layer, plan, base, q.group_size, q.symmetric)
    data = recipe.to_dict()
    data["quant"] = {**data["quant"], "bits": base, "overrides": overrides}
    data["output_dir"] = f"{str(recipe.output_dir).rstrip('/')}-cvxq{avg_bits:g}"
    return validate(data), {"bits": base, "overrides": overrides}


def run_bits(args) -> int:
    import numpy as np
    import yaml

    from .analyze.bitalloc import allocate, distortion, export_bytes, layer_stats
    from .analyze.setup import load_setup
    from .recipe import load_recipe
    from .train import DTYPES

    recipe = load_recipe(args.recipe, args.overrides)
    _check_counts(args)
    choices = parse_bits(args.bits)
    if recipe.quant is None:
        raise RecipeError("quant: the allocation needs a quant section (group size, targets)")
    if not choices[0] <= args.avg_bits <= choices[-1]:
        raise RecipeError(f"--avg-bits: must lie within the supported widths [{choices[0]}, {choices[-1]}] (got {args.avg_bits})")
    out = _out_dir(args, recipe, f"bits{args.avg_bits:g}")
    setup = load_setup(recipe, args.batches * args.batch_size, 1, args.device)
    print(f"bits: gradients of the FP model over {setup.calib.n_tokens} calibration tokens, {len(setup.plan)} layers")
    stats = layer_stats(setup, args.batch_size)
    d = np.array([s["g2"] * s["s2"] for s in stats])
    n = np.array([s["n_params"] for s in stats], dtype=float)
    alloc = allocate(d, n, args.avg_bits, choices)
    bits_by_layer = {s["name"]: int(b) for s, b in zip(stats, alloc.bits)}
    new_recipe, quant_snippet = allocation_recipe(recipe, bits_by_layer, setup.plan, args.avg_bits)

    scale_bytes = DTYPES[setup.save_dtype].itemsize
    layers = []
    for s, b, bc, bl in zip(stats, alloc.bits, alloc.continuous, alloc.lagrangian_bits):
        sch = setup.plan[s["name"]]
        layers.append({**s, "d": s["g2"] * s["s2"], "continuous_bits": float(bc), "lagrangian_bits": int(bl), "bits": int(b),
                       "export_bytes": export_bytes(tuple(s["shape"]), int(b), sch.group_size, sch.symmetric, scale_bytes)})
    uniform = {int(b): distortion(d, n, np.full(len(d), b)) for b in choices}
    result = {
        "recipe": str(args.recipe),
        "model": recipe.model.path,
        "avg_bits_target": args.avg_bits,
        "choices": list(choices),
        "granularity": args.granularity,
        "avg_bits": alloc.avg_bits,
        "budget_code_bits": alloc.budget_bits,
        "used_code_bits": float(np.dot(alloc.bits, n)),
        "lambda": alloc.lam,
        "rounding": alloc.rounding,
        "distortion": alloc.distortion,
        "distortion_uniform": uniform,
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
        f"# CVXQ allocation: average {alloc.avg_bits:.4f} code bits per weight (target {args.avg_bits}), choices {list(choices)}\n"
        + yaml.safe_dump({"quant": quant_snippet}, sort_keys=False)
    )
    (out / "recipe.yaml").write_text(new_recipe.to_yaml())
    print(bits_table(layers))
    print(f"average {alloc.avg_bits:.4f} code bits per weight (target {args.avg_bits}; {alloc.rounding} rounding), "
          f"model distortion sum n G^2 S^2 4^-b = {alloc.distortion:.4g} (uniform: "
          + ", ".join(f"W{b} {v:.4g}" for b, v in uniform.items()) + ")")
    print(f"expected compressed-tensors bytes of the quantized layers: {result['export_bytes_expected']:,}")
    print(f"wrote {out}/allocation.json, overrides.yaml, recipe.yaml; e.g. qat ptq {out}/recipe.yaml --method gptq")
    return 0


def bits_table(layers: list[dict]) -> str:
    types = list(dict.fromkeys(r["type"] for r in layers))
    depths = sorted({r["depth"] for r in layers})
    cell = {(r["type"], r["depth"]): r["bits"] for r in layers}
    lines = ["type \\ depth " + " ".join(f"{d:>3}" for d in depths)]
    for t in types:
        lines.append(f"{t:<13}" + " ".join(f"{cell.get((t, d), '-'):>3}" for d in depths))
    return "\n".join(lines)


def add_parser(sub) -> None:
    from .analyze.sensitivity import RANK_KEYS

    p = sub.add_parser("analyze", help="layer sensitivity ('Oh! We Freeze') and CVXQ bit allocation for a recipe's model")
    asub = p.add_subparsers(dest="analysis", required=True)

    def common(a):
        a.add_argument("recipe", help="YAML training recipe (its model, quant scheme, data)")
        a.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="e.g. quant.bits=3 quant.group_size=128")
        a.add_argument("--batches", type=int, default=4, help="calibration micro-batches for the gradients (default 4)")
        a.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch (default 4)")
        a.add_argument("--device", help="default: cuda if available, else cpu")
        a.add_argument("--out", help="output directory")

    s = asub.add_parser("sensitivity", help="per layer type and depth: gradient norms, output error, NLL change under fake-quant")
    common(s)
    s.add_argument("--valid-tokens", type=int, default=16384, help="held-out validation tokens for errors and NLL (default 16384)")
    s.add_argument("--no-per-depth", action="store_true", help="skip the one-layer-at-a-time NLL (one evaluation per layer)")
    s.add_argument("--rank-by", default="grad_ratio_all", choices=list(RANK_KEYS), help="what ranks the types (default grad_ratio_all)")
    s.add_argument("--freeze-top", type=int, default=2, help="how many of the most fragile types the suggested freeze policy lists")
    s.set_defaults(func=run_sensitivity)

    b = asub.add_parser("bits", help="CVXQ bit allocation for a target average bit width")
    common(b)
    b.add_argument("--avg-bits", type=float, required=True, help="target parameter-weighted average of code bits, e.g. 3.0 or 2.5")
    b.add_argument("--bits", default="2,3,4,8", help="supported widths (default 2,3,4,8)")
    b.add_argument("--granularity", default="layer", choices=["layer"], help="one width per layer (row clusters: not supported)")
    b.set_defaults(func=run_bits, valid_tokens=None)
