"""``qat train RECIPE [dotted.key=value ...] [--overwrite]``."""

from __future__ import annotations


def run(args) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from .train import train  # heavy imports only once the recipe is known to be valid

    out = train(recipe, overwrite=args.overwrite)
    print(f"run directory: {out}")
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="run a recipe (QAT, or plain fine-tuning / pretraining with quant: null)")
    t.add_argument("recipe", help="YAML recipe")
    t.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="e.g. train.max_steps=0 quant.bits=3")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    t.set_defaults(func=run)
