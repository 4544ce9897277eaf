"""lm-evaluation-harness on the in-memory model (optional: the ``eval`` extra, ``qat.deps.hint``).

``run_lm_eval(model, tokenizer, tasks)`` wraps the model with ``HFLM(pretrained=model)`` (no
reload, so a PEFT-corrected or freshly quantized model is evaluated as it is) and runs
``lm_eval.simple_evaluate``. Besides registered task names, a task may be a local file, for
offline use; a task YAML is generated for it:

- ``.jsonl`` / ``.json`` records with ``text``: a rolling-loglikelihood perplexity task (word and
  byte perplexity, bits per byte);
- records with ``query`` (or ``question``), ``choices`` and ``gold`` (or ``label``, an index): a
  multiple-choice task (``acc``, ``acc_norm``).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

from ..deps import require
from ..recipe import RecipeError


def _records(path: Path) -> list[dict]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data if isinstance(data, list) else data.get("data", [])


def local_task_yaml(path: Path, out_dir: Path) -> str:
    """Write a task YAML for a local JSON/JSONL file into ``out_dir``; returns the task name."""
    import yaml

    path = path.resolve()
    recs = _records(path)
    if not recs:
        raise RecipeError(f"--tasks: {path} holds no records")
    name = "qat_local_" + re.sub(r"\W", "_", path.stem)
    data_file = path
    if path.suffix == ".json":  # lm-eval's json loader wants one record per line or a top-level list
        data_file = out_dir / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
    }
    first = recs[0]
    if "text" in first:
        cfg.update(
            output_type="loglikelihood_rolling",
            doc_to_text="",
            doc_to_target="{{text}}",
            metric_list=[{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        )
    elif "choices" in first and ("gold" in first or "label" in first):
        q = "query" if "query" in first else "question"
        gold = "gold" if "gold" in first else "label"
        cfg.update(
            output_type="multiple_choice",
            doc_to_text="{{" + q + "}}",
            doc_to_choice="{{choices}}",
            doc_to_target="{{" + gold + "}}",
            metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                         {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        )
    else:
        raise RecipeError(f"--tasks: {path}: records need 'text' (perplexity) or 'query'/'choices'/'gold' (multiple choice)")
    (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return name


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    include_path: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    max_length: int | None = None,
    num_fewshot: int | None = None,
) -> dict[str, dict]:
    """``{task: {metric: value}}`` from lm-evaluation-harness on the in-memory ``model``."""
    lm_eval = require("lm_eval", "--tasks (lm-evaluation-harness)")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="qat-lmeval-") as tmp:
        names, paths = [], [include_path] if include_path else []
        for t in tasks:
            p = Path(t)
            if p.suffix in (".json", ".jsonl") and p.is_file():
                names.append(local_task_yaml(p, Path(tmp)))
                if tmp not in paths:
                    paths.append(tmp)
            else:
                names.append(t)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        manager = TaskManager(include_path=paths or None)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False
        )
    return {task: {k: _clean(v) for k, v in metrics.items() if k != "alias"} for task, metrics in out["results"].items()}
