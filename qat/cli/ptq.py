"""``qat ptq RECIPE --method rtn|rtn-mse|gptq|awq|qera-exact|qera-approx|nf4|block-ap [dotted.key=value ...] [--overwrite]``.

Writes to ``<output_dir>-ptq-<method>`` (beside the QAT run of the same recipe), or exactly to
``X`` when the command line sets ``output_dir=X``.
"""

from __future__ import annotations

import sys

from ..io.rundir import DiskError
from ..recipe import PTQ_METHODS, RecipeError, load_recipe


def run(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    from ..ptq import run_ptq

    explicit = any(o.split("=", 1)[0] == "output_dir" for o in args.overrides)
    if args.processes < 1:
        raise RecipeError(f"--processes: must be at least 1 (got {args.processes})")
    try:
        out = run_ptq(recipe, args.method, recipe.output_dir if explicit else None, overwrite=args.overwrite, processes=args.processes)
    except DiskError as e:
        print(f"qat ptq: {e}", file=sys.stderr)
        return 1
    print(f"run directory: {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("ptq", help="post-training quantization baseline (RTN, GPTQ, AWQ, QERA) of a recipe's model")
    p.add_argument("recipe", help="YAML recipe (its model, quant scheme, training data as calibration data)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="e.g. ptq.calib_tokens=65536 ptq.gptq.act_order=true")
    p.add_argument("--method", required=True, choices=PTQ_METHODS)
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="processes the QAT run trains with: the calibration budget is its global one (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in the output directory")
    p.set_defaults(func=run)
