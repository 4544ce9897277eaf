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

from ..analyze import RANK_KEYS
from ..deps import hint
from ..quant.scheme import SUPPORTED_BITS
from ..recipe import RecipeError, load_recipe


def _check_counts(args) -> None:
    for flag in ("batches", "batch_size", "valid_tokens"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise RecipeError(f"--{flag.replace('_', '-')}: must be a positive integer (got {v})")


def run_sensitivity(args) -> int:
    from ..analyze.report import out_dir, sensitivity_report  # heavy (transformers, datasets): only once the command line parsed
    from ..analyze.sensitivity import table_md

    recipe = load_recipe(args.recipe, args.overrides)
    _check_counts(args)
    out = out_dir(args.out, recipe, "sensitivity")
    result, title, png = sensitivity_report(recipe, args.recipe, out, args.batches, args.batch_size, args.valid_tokens, args.device,
                                            per_depth=not args.no_per_depth, rank_by=args.rank_by, freeze_top=args.freeze_top)
    print(table_md(result, title).split("\n## ")[0])
    print(result["freeze_snippet"])
    print(f"wrote {out}/sensitivity.json, sensitivity.md, freeze.yaml" + (", sensitivity.png" if png else f" (no PNG: {hint('matplotlib', 'the plot')})"))
    return 0


def parse_bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise RecipeError(f"--bits: expected comma-separated integers like 2,3,4,8 (got {text!r})") from None
    bad = [b for b in bits if b not in SUPPORTED_BITS]
    if not bits or bad:
        raise RecipeError(f"--bits: each width must be one of {list(SUPPORTED_BITS)} (got {text!r})")
    return bits


def run_bits(args) -> int:
    from ..analyze.report import bits_report, bits_table, out_dir  # heavy (transformers, datasets): only once the command line parsed

    recipe = load_recipe(args.recipe, args.overrides)
    _check_counts(args)
    choices = parse_bits(args.bits)
    out = out_dir(args.out, recipe, f"bits{args.avg_bits:g}")
    r = bits_report(recipe, args.recipe, out, args.avg_bits, choices, args.granularity, args.batches, args.batch_size, args.device)
    print(bits_table(r["layers"]))
    print(f"average {r['avg_bits']:.4f} code bits per weight (target {args.avg_bits}; {r['rounding']} rounding), "
          f"model distortion sum n G^2 S^2 4^-b = {r['distortion']:.4g} (uniform: "
          + ", ".join(f"W{b} {v:.4g}" for b, v in r["distortion_uniform"].items()) + ")")
    print(f"expected compressed-tensors bytes of the quantized layers: {r['export_bytes_expected']:,}")
    print(f"wrote {out}/allocation.json, overrides.yaml, recipe.yaml; e.g. qat ptq {out}/recipe.yaml --method gptq")
    return 0


def add_parser(sub) -> None:
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
