"""``qat eval MODEL_OR_RUN_DIR [--data FILE ...] [--seq-len N] [--stride S] [--teacher PATH] [--tasks ...]``.

- a run directory (``qat train`` / ``qat ptq``): evaluates ``final/`` (with ``final/adapter`` when
  there is one); data, sequence length, document separator, token cap (``data.max_valid_tokens``)
  and teacher default to the run's recipe (its validation split), which reproduces the run's own
  ``eval.json`` numbers when the recipe sets no ``eval.max_batches``;
- a model directory or hub id: ``--data`` is required.

Perplexity over non-overlapping windows of the document stream (``eos`` before every document,
the remainder dropped), or overlapping ones with ``--stride`` (each token scored once, with at
least ``seq_len - stride`` tokens of context); deterministic; prints and writes (``--out``) the
number of tokens evaluated, and the KL to the teacher when one is given. ``--tasks`` runs
lm-evaluation-harness tasks (``pip install 'qat[eval]'``) on the same in-memory model; a task may
be a local ``.json`` / ``.jsonl`` file (see ``qat/harness.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .deps import available, hint
from .recipe import RecipeError, UsageError

DEFAULT_SEPARATOR = "\n<|endoftext|>\n"


def load_model_dir(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer)`` of a model directory; applies ``adapter/`` (PEFT) when present."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train import DTYPES

    path = Path(path)
    kw = {} if dtype == "auto" else {"dtype": DTYPES[dtype]}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    adapter = path / "adapter"
    if (adapter / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.to(torch.device(device)).eval().requires_grad_(False)
    return model, tokenizer


def run_recipe(run_dir: Path):
    from .recipe import load_recipe

    path = run_dir / "recipe.yaml"
    return load_recipe(path, check_files=False) if path.exists() else None


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a local path, so it is never sent to the model hub: it starts
    with ``.``, ``/`` or ``~``, has more than one ``/`` (a hub id is ``org/name``), or its first
    part is a directory here (``runs/typo``)."""
    if name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def check_args(args, target: Path, recipe) -> list[str]:
    """Every problem with the command line, found before any weights load."""
    if not target.exists() and looks_local(args.model):
        return [f"no such directory: {args.model}"]
    if target.is_dir() and recipe is None and not (target / "config.json").is_file():
        return [f"{args.model} is neither a run directory (with final/) nor a model directory (with config.json)"]
    problems = []
    if not (args.seq_len or recipe):
        problems.append("--seq-len: required when evaluating a model directory (no recipe to take it from)")
    if not (args.data or recipe):
        problems.append("--data: required when evaluating a model directory (no recipe to take it from)")
    if args.tasks and not available("lm_eval"):
        problems.append(hint("lm_eval", "--tasks"))
    return problems


def evaluate(args) -> dict:
    import torch

    from .data import load_documents
    from .eval import make_windows, perplexity, token_stream
    from .recipe import DataSection

    target = Path(args.model).expanduser()
    run_dir = target if (target / "final").is_dir() else None
    recipe = run_recipe(run_dir) if run_dir is not None else None
    problems = check_args(args, target, recipe)
    if problems:
        raise UsageError("\n".join(problems))
    seq_len = args.seq_len or recipe.data.seq_len
    if args.data:
        sep = args.doc_separator if args.doc_separator is not None else (recipe.data.doc_separator if recipe else DEFAULT_SEPARATOR)
        section = DataSection(source="files", files=args.data, format=args.data_format, doc_separator=sep or None, seq_len=seq_len)
        try:
            docs = load_documents(section, "train")
        except ValueError as e:
            raise UsageError(str(e).replace("data.files", "--data").replace("set data.format", "pass --data-format text|json|parquet")) from None
        what = ", ".join(args.data)
    else:
        try:
            docs = load_documents(recipe.data, "valid", seed=recipe.train.seed)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        if not docs:
            raise UsageError("--data: the run's recipe has no validation split; pass --data")
        what = "the run's validation split"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_dir(run_dir / "final" if run_dir else target if target.exists() else args.model, args.dtype, device)

    max_tokens = args.max_tokens
    if max_tokens is None and recipe is not None and not args.data:
        max_tokens = recipe.data.max_valid_tokens  # the run's own evaluation protocol
    try:
        windows = make_windows(token_stream(docs, tokenizer, max_tokens), seq_len, args.stride, max_tokens)
    except ValueError as e:
        raise UsageError(f"--seq-len/--stride: {e}") from None

    teacher = None
    teacher_path = args.teacher or (recipe.teacher_path if recipe is not None and recipe.teacher is not None else None)
    if teacher_path and not args.no_teacher:
        teacher, _ = load_model_dir(teacher_path, args.dtype, device)
    res = perplexity(model, windows, args.batch_size, teacher=teacher, desc="eval")
    result = {
        "model": str(target),
        "data": what,
        "seq_len": seq_len,
        "stride": args.stride or seq_len,
        "windows": len(windows),
        "tokens": res["tokens"],
        "ppl": res["ppl"],
        "nll": res["nll"],
    }
    if teacher is not None:
        result.update(teacher=str(teacher_path), kl_to_teacher=res["kl_to_teacher"], teacher_ppl=res["teacher_ppl"])
    if args.tasks:
        from .harness import run_lm_eval

        result["lm_eval"] = run_lm_eval(
            model, tokenizer, args.tasks, include_path=args.include_path, batch_size=args.batch_size, limit=args.limit, max_length=seq_len
        )
    return result


def run(args) -> int:
    result = evaluate(args)
    line = f"perplexity {result['ppl']:.4f} over {result['tokens']} tokens ({result['windows']} windows of {result['seq_len']}, stride {result['stride']})"
    if "kl_to_teacher" in result:
        line += f"; teacher {result['teacher_ppl']:.4f}, KL to teacher {result['kl_to_teacher']:.5f}"
    print(line)
    for task, metrics in (result.get("lm_eval") or {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"  {task}: {shown}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (+ KL to a teacher, + lm-eval tasks) of a model or run directory")
    p.add_argument("model", metavar="MODEL_OR_RUN_DIR")
    p.add_argument("--data", nargs="+", help="text/json/jsonl/parquet files or globs (.gz ok); default: the run's validation split")
    p.add_argument("--data-format", default="auto", choices=["auto", "text", "json", "parquet"],
                   help="format of --data files (default: from the extension; .jsonl is json)")
    p.add_argument("--seq-len", type=int, help="window length (default: the run's data.seq_len)")
    p.add_argument("--stride", type=int, help="window stride < seq-len for overlapping windows (default: no overlap)")
    p.add_argument("--max-tokens", type=int, help="use only the first N tokens of the stream")
    p.add_argument("--doc-separator", help=f"split texts into documents on this string (default: the run's, else {DEFAULT_SEPARATOR!r})")
    p.add_argument("--teacher", help="model to report the KL to (default: the run's teacher)")
    p.add_argument("--no-teacher", action="store_true", help="skip the KL to the run's teacher")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--tasks", nargs="+", help="lm-evaluation-harness task names or local .json/.jsonl task files")
    p.add_argument("--include-path", help="directory of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=int, help="lm-eval: at most N examples per task")
    p.add_argument("--out", help="write the result as JSON here")
    p.set_defaults(func=run)
