"""``qat train RECIPE [dotted.key=value ...] [--overwrite]``."""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path

from ..dist import CollectiveTimeout, rank_zero
from ..io.checkpoint import CheckpointError, latest_checkpoint
from ..io.rundir import DiskError
from ..recipe import load_recipe


def resume_hint(recipe, args) -> str:
    """Where the newest complete checkpoint is, and the command that continues from it."""
    out = Path(recipe.output_dir)
    last = latest_checkpoint(out / "checkpoints") if (out / "checkpoints").is_dir() else None
    if last is None:
        return f"No checkpoint was written in {out} (checkpoint.every={recipe.checkpoint.every}); rerun the command to start over."
    kept = [o for o in args.overrides if not o.startswith("checkpoint.resume=")]
    cmd = shlex.join(["qat", "train", str(args.recipe), *kept, "checkpoint.resume=auto"])
    return f"Last checkpoint: {last}; resume with: {cmd}"


def run(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    from ..train.loop import LaunchError, TrainingStopped, train  # heavy imports only once the recipe is known to be valid

    try:
        out = train(recipe, overwrite=args.overwrite)
    except (TrainingStopped, CheckpointError, DiskError, CollectiveTimeout) as e:  # a clear message, no traceback; exit 1
        print(f"qat: training stopped: {e}", file=sys.stderr)
        return 1
    except LaunchError as e:  # every rank raises it; one says it
        if rank_zero():
            print(f"qat: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, where the run can pick up again
        signum = getattr(e, "signum", signal.SIGINT)
        if rank_zero():
            print(f"\nqat: interrupted ({signal.Signals(signum).name}). {resume_hint(recipe, args)}", file=sys.stderr)
        return 128 + signum
    if rank_zero():
        print(f"run directory: {out}")
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="run a recipe (QAT, or plain fine-tuning / pretraining with quant: null)")
    t.add_argument("recipe", help="YAML recipe")
    t.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="e.g. train.max_steps=0 quant.bits=3")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    t.set_defaults(func=run)
