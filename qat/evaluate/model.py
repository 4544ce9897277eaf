"""Evaluate a run's final/ or any model directory on a run's validation split or on text files:
the library side of ``qat eval`` (the command line is ``qat.cli.eval``).

- a run directory (``qat train`` / ``qat ptq``): evaluates ``final/`` (with ``final/adapter`` when
  there is one); data, sequence length, document separator, token cap (``data.max_valid_tokens``)
  and teacher default to the run's recipe (its validation split), which reproduces the run's own
  ``eval.json`` numbers when the recipe sets no ``eval.max_batches``;
- a model directory or hub id: ``--data`` is required.

Perplexity over non-overlapping windows of the document stream (``eos`` before every document,
the remainder dropped), or overlapping ones with ``stride`` (each token scored once, with at
least ``seq_len - stride`` tokens of context); deterministic. ``tasks`` runs
lm-evaluation-harness tasks on the same in-memory model (``harness.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import load_documents
from ..deps import available, hint
from ..io.models import first_line, load_model_dir, vocab_size
from ..recipe import DataSection, RecipeError, UsageError, load_recipe
from .harness import run_lm_eval
from .perplexity import make_windows, perplexity, token_stream

DEFAULT_SEPARATOR = "\n<|endoftext|>\n"


@dataclass
class EvalRequest:
    """What to evaluate and how (the options of ``qat eval``)."""

    model: str
    data: list[str] | None = None
    data_format: str = "auto"
    seq_len: int | None = None
    stride: int | None = None
    max_tokens: int | None = None
    doc_separator: str | None = None
    teacher: str | None = None
    no_teacher: bool = False
    batch_size: int = 8
    dtype: str = "float32"
    device: str | None = None
    tasks: list[str] | None = None
    include_path: str | None = None
    limit: int | None = None


def run_recipe(run_dir: Path):
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
    for opt in ("batch_size", "seq_len", "stride", "max_tokens", "limit"):
        v = getattr(args, opt)
        if v is not None and v <= 0:
            problems.append(f"--{opt.replace('_', '-')}: expected a positive integer, got {v}")
    if not (args.seq_len or recipe):
        problems.append("--seq-len: required when evaluating a model directory (no recipe to take it from)")
    if not (args.data or recipe):
        problems.append("--data: required when evaluating a model directory (no recipe to take it from)")
    if args.tasks and not available("lm_eval"):
        problems.append(hint("lm_eval", "--tasks"))
    return problems


def evaluate_model(args: EvalRequest) -> dict:
    """Perplexity (+ KL to a teacher, + lm-eval tasks) of a run's final/ or a model directory;
    every problem with the request is reported before any weights load."""
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
    remote = recipe.model.trust_remote_code if recipe is not None else False  # the run's own setting
    source = run_dir / "final" if run_dir else target if target.exists() else args.model
    try:
        model, tokenizer = load_model_dir(source, args.dtype, device, remote)
    except (OSError, ValueError) as e:  # a damaged config.json / weights, or not a model directory
        raise UsageError(f"{source}: cannot be loaded as a model ({e.__class__.__name__}: {first_line(e)})") from None

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
        from transformers import AutoConfig

        try:
            t_vocab = vocab_size(AutoConfig.from_pretrained(str(teacher_path), trust_remote_code=remote))
        except (OSError, ValueError) as e:
            raise UsageError(f"--teacher: {teacher_path} cannot be loaded as a model ({e.__class__.__name__}: {first_line(e)})") from None
        if t_vocab != vocab_size(model.config):
            raise UsageError(f"--teacher: {teacher_path} has a vocabulary of {t_vocab} ids and the model {vocab_size(model.config)}; "
                             "the KL needs the same vocabulary (or pass --no-teacher)")
        teacher, _ = load_model_dir(teacher_path, args.dtype, device, remote)
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
        result["lm_eval"] = run_lm_eval(
            model, tokenizer, args.tasks, include_path=args.include_path, batch_size=args.batch_size, limit=args.limit, max_length=seq_len
        )
    return result
