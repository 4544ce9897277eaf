"""``qat eval MODEL_OR_RUN_DIR [--data FILE ...] [--seq-len N] [--stride S] [--teacher PATH] [--tasks ...]``
(``qat.evaluate.model`` does the work)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def run(args) -> int:
    from ..evaluate.model import EvalRequest, evaluate_model  # heavy (transformers, datasets): only once the command line parsed

    result = evaluate_model(EvalRequest(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalRequest)}))
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
    p.add_argument("--doc-separator", help="split texts into documents on this string (default: the run's, else '\\n<|endoftext|>\\n')")
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
