"""``qat train RECIPE [dotted.key=value ...] [--overwrite]``."""

from __future__ import annotations

import sys


def run(args) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from .checkpoint import CheckpointError
    from .train import TrainingStopped, train  # heavy imports only once the recipe is known to be valid

    try:
        out = train(recipe, overwrite=args.overwrite)
    except (TrainingStopped, CheckpointError) as e:  # a clear message, no traceback; exit 1
        print(f"qat: training stopped: {e}", file=sys.stderr)
        return 1
    print(f"run directory: {out}")
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="run a recipe (QAT, or plain fine-tuning / pretraining with quant: null)")
    t.add_argument("recipe", help="YAML recipe")
    t.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="e.g. train.max_steps=0 quant.bits=3")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    t.set_defaults(func=run)
