"""``qat compare RECIPE... [dotted.key=value ...] [--out DIR] [--runs-root DIR] [--rerun] [--no-qat]``."""

from __future__ import annotations

from pathlib import Path

from ..recipe import RecipeError, load_recipe


def run(args) -> int:
    from ..compare import compare  # heavy (transformers, datasets): only once the command line parsed

    items = list(args.items) + list(args.overrides)
    files = [i for i in items if "=" not in i or Path(i).is_file()]
    overrides = [i for i in items if i not in files]
    if not files:
        raise RecipeError("<recipe>: give at least one recipe file")
    recipes = [load_recipe(f, overrides) for f in files]
    if args.runs_root:
        recipes = [r.model_copy(update={"output_dir": str(Path(args.runs_root) / Path(r.output_dir).name)}) for r in recipes]
    if args.out:
        out = Path(args.out)
    elif len(recipes) == 1:
        out = Path(f"{str(recipes[0].output_dir).rstrip('/')}-compare")
    else:
        out = Path(args.runs_root or "runs") / "compare"
    compare(recipes, files, out, rerun=args.rerun, with_qat=not args.no_qat)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="QAT vs the PTQ baselines of a recipe: report.{json,md,png}")
    p.add_argument("items", nargs="+", metavar="RECIPE|dotted.key=value", help="recipe files, then overrides applied to each")
    p.add_argument("--out", help="report directory (default: <output_dir>-compare, or runs/compare for several recipes)")
    p.add_argument("--runs-root", help="put each recipe's runs in RUNS_ROOT/<basename of its output_dir> (several recipes, one override)")
    p.add_argument("--rerun", action="store_true", help="run every variant again instead of reusing complete runs")
    p.add_argument("--no-qat", action="store_true", help="PTQ methods and FP only")
    p.set_defaults(func=run, overrides=[])
