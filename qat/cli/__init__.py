"""``qat`` command line: thin wrappers that parse, call, and turn recipe errors into exit code 2.

Each command is a module of this package (argparse and printing only) that registers itself with
``add_parser(sub)`` and calls the library; ``COMMANDS`` lists them in the order ``qat --help`` shows.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..deps import MissingDependency
from ..quant.scheme import QuantConfigError
from ..recipe import RecipeError, UsageError
from . import analyze, compare, env, export, keys, ptq, train
from . import eval as eval_cmd

COMMANDS = (train, export, ptq, eval_cmd, compare, analyze, keys, env)  # the order `qat --help` lists them


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qat", description="Quantization-aware fine-tuning of Hugging Face causal LMs.")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return p


def quiet_libraries() -> None:
    """qat shows its own progress (training steps, evaluation, calibration blocks); the bars of the
    libraries underneath (transformers' "Loading weights" / "Writing model shards", datasets'
    "Flattening the indices") repeat for every model and split and are turned off.
    ``QAT_LIBRARY_PROGRESS=1`` keeps them (e.g. to watch a 70B checkpoint load)."""
    if os.environ.get("QAT_LIBRARY_PROGRESS") == "1":
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides after an option (`qat ptq R --method gptq a=1`): argparse leaves them over
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    quiet_libraries()
    try:
        return args.func(args) or 0
    except UsageError as e:
        print("\n".join(f"qat {args.command}: {line}" for line in str(e).splitlines()), file=sys.stderr)
        return 2
    except (RecipeError, QuantConfigError) as e:
        lines = str(e).splitlines() or [""]
        print("qat: recipe error:\n" + "\n".join(f"  {line}" for line in lines), file=sys.stderr)
        return 2
    except MissingDependency as e:
        print(f"qat: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
