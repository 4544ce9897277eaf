"""``qat`` command line: thin wrappers that parse, call, and turn recipe errors into exit code 2."""

from __future__ import annotations

import argparse
import sys

from .quant.scheme import QuantConfigError
from .recipe import RecipeError


def _train(args) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from .train import train  # heavy imports only once the recipe is known to be valid

    out = train(recipe, overwrite=args.overwrite)
    print(f"run directory: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qat", description="Quantization-aware fine-tuning of Hugging Face causal LMs.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a recipe (QAT, or plain fine-tuning with quant: null)")
    t.add_argument("recipe", help="YAML recipe")
    t.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="e.g. train.max_steps=0 quant.bits=3")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    t.set_defaults(func=_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RecipeError, QuantConfigError) as e:
        lines = str(e).splitlines() or [""]
        print("qat: recipe error:\n" + "\n".join(f"  {line}" for line in lines), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
