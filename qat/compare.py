"""``qat compare RECIPE [RECIPE ...] [dotted.key=value ...]``: QAT against the PTQ baselines.

For every recipe: the PTQ methods of ``ptq.methods`` (each a ``qat ptq`` run in
``<output_dir>-ptq-<method>``) and the QAT run (``qat train`` in ``output_dir``) are run, or reused
when their run directory is complete and was made from the same recipe (``--rerun`` forces new
runs). A PTQ run directory made from a different recipe is redone in place (those directories
belong to ``compare``); a QAT run from a different recipe is never replaced without ``--rerun``. All of them are evaluated by the same code on the same validation blocks (``eval.json``);
the FP row is the teacher on those blocks. The per-layer relative output error of every variant
is measured on the same held-out tokens with the teacher's inputs (``qat/evaluate/diagnostic.py``).

Writes to ``--out`` (default ``<output_dir>-compare`` for one recipe, ``<runs root>/compare`` for
several; ``--runs-root DIR`` moves every recipe's runs to ``DIR/<basename of output_dir>``): ``report.json`` (every number, per-layer errors included), ``report.md`` (method, bits,
group, ppl, ppl/FP, KL to teacher, mean layer output error, data tokens, wall time, and the
local-vs-global inversions), ``report.png`` (perplexity by method and bit width; mean layer
error against KL), and logs the table to wandb when the recipe's tracking is on.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

from .data import build_datasets
from .data.plans import heldout_blocks, qat_train_tokens
from .deps import MissingDependency, available, hint, require
from .evaluate.diagnostic import bits_per_weight, layer_output_errors, local_vs_global_inversions, mean_error
from .evaluate.perplexity import perplexity
from .io.final import effective_weights
from .io.models import load_teacher, load_tokenizer
from .ptq import default_run_dir, run_ptq
from .recipe import Recipe, RecipeError, validate
from .train.loop import train
from .train.tracking import resolve_precision


# -- runs ---------------------------------------------------------------------------------
# what a PTQ run does not depend on: how QAT trains (a PTQ run reads train.* only for its
# calibration budget and order: max_steps, epochs, micro_batch_size, grad_accum, seed)
_NOT_PTQ = ("distill", "freeze", "checkpoint", "peft")
_NOT_PTQ_QUANT = ("learnable", "lsq_grad_scale", "kernel", "start_step", "init_from")
_PTQ_TRAIN = ("max_steps", "epochs", "micro_batch_size", "grad_accum", "seed")
# the ptq.<section> options each method reads (QERA's base may be GPTQ); the others do not decide its result
_PTQ_OPTIONS = {"gptq": ("gptq",), "awq": ("awq",), "qera-exact": ("qera", "gptq"), "qera-approx": ("qera", "gptq"), "block-ap": ("block_ap",)}
_PTQ_SECTIONS = ("gptq", "awq", "qera", "block_ap")


def _comparable(d: dict, kind: str, method: str | None = None) -> dict:
    """The part of a resolved recipe that decides a run's result (of PTQ ``method``), for reuse."""
    d = json.loads(json.dumps(d))
    for k in ("output_dir", "tracking"):
        d.pop(k, None)
    if kind == "qat":
        d.pop("ptq", None)
        return d
    (d.get("ptq") or {}).pop("methods", None)
    if method is not None:
        for section in _PTQ_SECTIONS:
            if section not in _PTQ_OPTIONS.get(method, ()):
                (d.get("ptq") or {}).pop(section, None)
    for k in _NOT_PTQ:
        d.pop(k, None)
    for k in _NOT_PTQ_QUANT:
        (d.get("quant") or {}).pop(k, None)
        for o in (d.get("quant") or {}).get("overrides") or []:
            o.pop(k, None)
    d["train"] = {k: v for k, v in (d.get("train") or {}).items() if k in _PTQ_TRAIN}
    return d


def reusable(run_dir: Path, recipe: Recipe, kind: str, method: str | None = None) -> dict | None:
    """``eval.json`` of a complete run of the same recipe (and method) in ``run_dir``, else None."""
    ev, rp = run_dir / "eval.json", run_dir / "recipe.yaml"
    if not (ev.exists() and rp.exists() and (run_dir / "final").is_dir()):
        return None
    result = json.loads(ev.read_text())
    if method is not None and result.get("method") != method:
        return None

    try:  # through the current schema, so keys added since (with their defaults) compare equal
        old = validate(yaml.safe_load(rp.read_text()) or {})
    except RecipeError:
        return None
    if kind == "qat":  # what the run resolved before writing recipe.yaml: the precision, a default freeze policy
        recipe = recipe.model_copy(deep=True)
        resolve_precision(recipe)
        if old.train.mixed_precision is None:  # a recipe.yaml that left it to the launch configuration
            resolve_precision(old)
        _resolve_on_model(recipe)
    if _comparable(old.to_dict(), kind, method) != _comparable(recipe.to_dict(), kind, method):
        return None
    return result


def _resolve_on_model(recipe: Recipe) -> None:
    """The recipe's defaults that depend on the model's layers, resolved on a weightless copy."""
    if not (recipe.freeze._by_default and recipe.freeze.policy == "ov-freeze"):
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .policy import resolve_freeze_default

    m = recipe.model
    try:
        if m.path is not None:
            config = AutoConfig.from_pretrained(m.path, revision=m.revision, trust_remote_code=m.trust_remote_code)
        else:
            config = AutoConfig.for_model(**{"vocab_size": 64, **m.config})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)
    except Exception:  # the run itself reports a model that cannot be built
        return
    resolve_freeze_default(recipe, model)


def run_or_reuse_ptq(recipe: Recipe, method: str, rerun: bool, processes: int = 1) -> tuple[Path, dict, bool]:
    """A PTQ run calibrated on the QAT run's global budget (``processes``: the processes it trained with)."""
    d = default_run_dir(recipe, method)
    ev = None if rerun else reusable(d, recipe, "ptq", method)
    if ev is not None and ev.get("qat_processes", 1) == processes:
        return d, ev, True
    run_ptq(recipe, method, d, overwrite=True, processes=processes)
    return d, json.loads((d / "eval.json").read_text()), False


def run_or_reuse_qat(recipe: Recipe, rerun: bool) -> tuple[Path, dict, bool]:
    d = Path(recipe.output_dir)
    ev = None if rerun else reusable(d, recipe, "qat")
    if ev is not None:
        return d, ev, True
    if not rerun and any((d / f).exists() for f in ("recipe.yaml", "final", "checkpoints")):
        raise RecipeError(
            f"output_dir: {d} holds a QAT run that is incomplete or from a different recipe; "
            "pass --rerun to replace it (or finish it with qat train ... checkpoint.resume=auto)"
        )
    train(recipe, overwrite=True)
    return d, json.loads((d / "eval.json").read_text()), False


def qat_tokens(recipe: Recipe, ev: dict) -> int | None:
    """The QAT run's global token count (older runs recorded only their steps: one process)."""
    if "train_tokens" in ev:
        return ev["train_tokens"]
    return qat_train_tokens(recipe, ev["steps"]) if ev.get("steps") is not None else None


def scheme_label(recipe: Recipe) -> str:
    q = recipe.quant
    return f"W{q.bits}" + ("-channel" if q.group_size is None else f"g{q.group_size}")


# -- one recipe ---------------------------------------------------------------------------
def compare_recipe(recipe: Recipe, rerun: bool = False, with_qat: bool = True) -> dict:
    """Run or reuse every variant of one recipe, then measure them side by side: the FP teacher,
    each variant's perplexity / KL (from its eval.json) and its per-layer output errors on the
    same held-out tokens. Returns ``{"rows", "layer_errors", ...}``."""
    if recipe.quant is None or recipe.teacher is None or recipe.model.path is None:
        raise RecipeError("compare: the recipe needs model.path, a teacher and a quant section")
    if not recipe.data.valid_files and not recipe.data.valid_split and not recipe.data.valid_fraction:
        raise RecipeError("data: compare needs a validation split (data.valid_files, valid_split or valid_fraction)")
    label = scheme_label(recipe)
    qat = run_or_reuse_qat(recipe, rerun) if with_qat else None  # first: PTQ takes its global token budget
    processes = qat[1].get("processes", 1) if qat else 1
    runs: dict[str, tuple[Path, dict, bool]] = {m: run_or_reuse_ptq(recipe, m, rerun, processes) for m in recipe.ptq.methods}
    if qat:
        runs["qat"] = qat
    _, valid = build_datasets(recipe.data.model_copy(update={"max_train_tokens": recipe.data.seq_len}), load_tokenizer(recipe), seed=recipe.train.seed)
    device = torch.device(recipe.ptq.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher = load_teacher(recipe, device)
    fp, fp_source = fp_reference(recipe, label, runs, teacher, valid)
    held = heldout_blocks(valid, recipe.ptq.diag_tokens)
    errors = local_errors(recipe, label, runs, teacher, held)
    del teacher
    rows = [fp_row(recipe, label, fp, fp_source)] + [variant_row(recipe, label, m, run, fp, errors[m]) for m, run in runs.items()]
    return {"recipe": label, "fp_source": fp_source, "diag_tokens": held.n_tokens, "rows": rows, "layer_errors": errors}


def fp_reference(recipe: Recipe, label: str, runs: dict, teacher, valid) -> tuple[dict, str]:
    """The teacher's perplexity on the validation blocks: from the runs' eval.json when they have
    it (warning when they disagree), else computed."""
    fps = [ev["teacher"] for _, ev, _ in runs.values() if "teacher" in ev]
    if fps:
        fp = fps[0]
        spread = max(abs(f["ppl"] - fp["ppl"]) / fp["ppl"] for f in fps)
        if spread > 1e-4:
            warnings.warn(f"{label}: the runs report teacher perplexities that differ by {spread:.2e} (different eval settings?)")
        return fp, "reused from the runs' eval.json"
    ev = recipe.eval
    return perplexity(teacher, valid, ev.batch_size, ev.max_batches, desc="eval teacher"), "computed"


def local_errors(recipe: Recipe, label: str, runs: dict, teacher, held) -> dict[str, dict[str, float]]:
    """Per-layer output errors of every variant on the same held-out tokens (reused from a run's
    eval.json when it measured them on exactly these tokens)."""
    errors: dict[str, dict[str, float]] = {}
    todo = {}
    for m, (d, ev, _) in runs.items():
        if ev.get("layer_errors") and ev.get("diag_tokens") == held.n_tokens:
            errors[m] = ev["layer_errors"]
        else:
            todo[m] = effective_weights(d / "final")
    if todo:
        errors.update(layer_output_errors(teacher, todo, held, recipe.eval.batch_size, desc=f"layer errors {label}"))
    return errors


def fp_row(recipe: Recipe, label: str, fp: dict, fp_source: str) -> dict:
    return {
        "recipe": label,
        "method": "fp (teacher)",
        "bits": {"float32": 32, "bfloat16": 16, "float16": 16}[recipe.teacher.dtype],
        "group_size": None,
        "bits_per_weight": None,
        "ppl": fp["ppl"],
        "ppl_ratio": 1.0,
        "kl_to_teacher": 0.0,
        "mean_layer_error": 0.0,
        "data_tokens": None,
        "wall_time_s": None,
        "quant_time_s": None,
        "eval_tokens": fp["tokens"],
        "run_dir": None,
        "reused": fp_source.startswith("reused"),
    }


def variant_row(recipe: Recipe, label: str, method: str, run: tuple[Path, dict, bool], fp: dict, errors: dict[str, float]) -> dict:
    d, ev, reused = run
    s = ev["student"]
    return {
        "recipe": label,
        "method": method,
        "bits": recipe.quant.bits,
        "group_size": recipe.quant.group_size,
        "bits_per_weight": bits_per_weight(d / "final"),
        "ppl": s["ppl"],
        "ppl_ratio": s["ppl"] / fp["ppl"],
        "kl_to_teacher": s.get("kl_to_teacher"),
        "mean_layer_error": mean_error(errors),
        "data_tokens": ev.get("calib_tokens") if method != "qat" else qat_tokens(recipe, ev),
        "wall_time_s": ev.get("wall_time_s"),
        "quant_time_s": ev.get("quant_time_s"),
        "eval_tokens": s["tokens"],
        "run_dir": str(d),
        "reused": reused,
    }


# -- report -------------------------------------------------------------------------------
def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec)


def table_md(rows: list[dict]) -> str:
    head = "| recipe | method | bits | group | bits/weight | ppl | ppl/FP | KL to teacher | mean layer out. err | data tokens | wall time (s) |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['method']} | {r['bits']} | {_fmt(r['group_size'], 'd') if r['group_size'] else ('–' if r['method'].startswith('fp') else 'channel')} "
            f"| {_fmt(r.get('bits_per_weight'), '.3f')} | {_fmt(r['ppl'], '.3f')} | {_fmt(r['ppl_ratio'], '.4f')} | {_fmt(r['kl_to_teacher'], '.4f')} "
            f"| {_fmt(r['mean_layer_error'], '.4f')} | {_fmt(r['data_tokens'], ',d')} | {_fmt(r['wall_time_s'], '.1f')} |"
        )
    return "\n".join(lines)


def report_md(report: dict) -> str:
    out = [
        "# QAT vs layerwise PTQ",
        "",
        f"{report['date']} · {report['device']} · recipes: {', '.join(report['recipe_files'])}",
        "",
        "ppl: validation perplexity (same blocks for every row); ppl/FP: against the teacher; KL: mean forward KL "
        "to the teacher per token; mean layer out. err: mean over quantized layers of ||XW - XŴ||/||XW|| on "
        "held-out validation tokens with the teacher's inputs; bits/weight: storage of the quantized layers (codes, "
        "fp16 group scales, zero-points if asymmetric, fp16 LoRA factors of a QERA correction); "
        "data tokens: PTQ calibration tokens or QAT training tokens; "
        "wall time: the whole run (load, quantize or train, evaluate).",
        "",
        table_md(report["rows"]),
        "",
        "## Local vs global",
        "",
    ]
    for part in report["recipes"]:
        rows = [r for r in part["rows"] if not r["method"].startswith("fp") and r["mean_layer_error"] is not None]
        ranked = sorted(rows, key=lambda r: r["mean_layer_error"])
        out.append(
            f"**{part['recipe']}** — by mean layer error: "
            + " < ".join(f"{r['method']} ({r['mean_layer_error']:.4f}, KL {_fmt(r['kl_to_teacher'], '.4f')})" for r in ranked)
        )
        inv = local_vs_global_inversions(rows)
        if inv:
            out.append("")
            for a, b in inv:
                out.append(f"- {a} has a lower local error than {b} but a higher global loss (KL to the teacher)")
        else:
            out.append("")
            out.append("- local error and global loss rank the methods the same way")
        out.append("")
    out += ["## Per-layer relative output error", ""]
    for part in report["recipes"]:
        methods = list(part["layer_errors"])
        layers = list(next(iter(part["layer_errors"].values()), {}))
        out += [f"<details><summary>{part['recipe']} ({len(layers)} layers, {part['diag_tokens']} held-out tokens)</summary>", ""]
        out.append("| layer | " + " | ".join(methods) + " |")
        out.append("|---|" + "---|" * len(methods))
        for layer in layers:
            out.append(f"| {layer} | " + " | ".join(_fmt(part["layer_errors"][m].get(layer), ".4f") for m in methods) + " |")
        out += ["", "</details>", ""]
    return "\n".join(out)


def report_png(report: dict, path: Path, value: str = "ppl") -> None:
    """Left: ``value`` (``ppl`` or ``ppl_ratio``) by method and bit width; right: mean layer error
    against KL to the teacher, every method (colour) and bit width (marker) on one axis."""
    matplotlib = require("matplotlib", "the report plot (report.png)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = list(dict.fromkeys(r["recipe"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows if not r["method"].startswith("fp")))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(methods))
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    if len(methods) > len(cycle):  # many methods (quality study): a 20-colour map
        cycle = [plt.get_cmap("tab20")(i % 20) for i in range(len(methods))]
    colors = {m: cycle[j % len(cycle)] for j, m in enumerate(methods)}
    markers = {lab: "osD^v<>p*"[i % 9] for i, lab in enumerate(labels)}
    for j, m in enumerate(methods):
        xs, ys = [], []
        for i, lab in enumerate(labels):
            r = next((r for r in rows if r["recipe"] == lab and r["method"] == m), None)
            if r is not None:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(r[value])
        ax.bar(xs, ys, width, label=m, color=colors[m])
    for i, lab in enumerate(labels):
        fp = next((r for r in rows if r["recipe"] == lab and r["method"].startswith("fp")), None)
        if fp is not None:
            ax.hlines(fp[value], i - 0.45, i + 0.45, colors="k", linestyles="--", label="FP (teacher)" if i == 0 else None)
    ax.set_xticks(range(len(labels)), labels)
    ppls = [r[value] for r in rows if r[value] == r[value]]
    name = "perplexity / FP" if value == "ppl_ratio" else "validation perplexity"
    if ppls and max(ppls) / min(ppls) > 3:
        ax.set_yscale("log")
        ax.set_ylabel(f"{name} (log scale)")
    else:
        ax.set_ylim(0.97 * min(ppls), 1.02 * max(ppls))
        ax.set_ylabel(name)
    ax.set_title(f"{name} by method and bit width")
    ax.legend(fontsize=6 if len(methods) > 8 else 8, ncol=2 if len(methods) > 8 else 1)
    for r in rows:
        if r["method"].startswith("fp") or r["kl_to_teacher"] is None or r["mean_layer_error"] is None:
            continue
        ax2.scatter(r["mean_layer_error"], r["kl_to_teacher"], s=36, color=colors[r["method"]], marker=markers[r["recipe"]])
    for m in methods:
        ax2.scatter([], [], color=colors[m], marker="o", label=m)
    for lab in labels:
        ax2.scatter([], [], color="gray", marker=markers[lab], label=lab)
    ax2.legend(fontsize=7, ncol=2)
    ax2.set_xlabel("mean layer output error (local)")
    ax2.set_ylabel("KL to teacher (global)")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_title("local vs global")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_wandb(recipe: Recipe, report: dict, out: Path) -> None:
    tr = recipe.tracking
    if tr.wandb_project is None or tr.mode == "disabled":
        return
    if not available("wandb"):
        print(f"qat: {hint('wandb', 'tracking.wandb_project')}; the comparison is not logged to wandb", file=sys.stderr)
        return
    try:
        import os

        import wandb

        os.environ.setdefault("WANDB_MODE", tr.mode)
        run = wandb.init(
            project=tr.wandb_project,
            entity=tr.entity,
            name=f"{tr.run_name or Path(recipe.output_dir).name}-compare",
            tags=list(tr.tags) + ["compare"],
            dir=str(out),
            mode=tr.mode,
            config={"recipes": report["recipe_files"]},
        )
        cols = ["recipe", "method", "bits", "group_size", "bits_per_weight", "ppl", "ppl_ratio", "kl_to_teacher", "mean_layer_error", "data_tokens", "wall_time_s"]
        run.log({"compare": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in report["rows"]])})
        if (out / "report.png").exists():
            run.log({"compare_plot": wandb.Image(str(out / "report.png"))})
        run.finish()
    except Exception as e:  # tracking must never fail the comparison
        warnings.warn(f"wandb logging of the comparison failed: {e.__class__.__name__}: {e}")


def compare(recipes: list[Recipe], recipe_files: list[str], out: Path, rerun: bool = False, with_qat: bool = True) -> dict:
    t0 = time.perf_counter()
    parts = [compare_recipe(r, rerun, with_qat) for r in recipes]
    import torch

    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    report = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "device": device,
        "recipe_files": recipe_files,
        "rows": [r for p in parts for r in p["rows"]],
        "recipes": parts,
    }
    out.mkdir(parents=True, exist_ok=True)
    report["wall_time_s"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(report_md(report))
    try:
        report_png(report, out / "report.png")
        made = "json,md,png"
    except MissingDependency as e:  # the tables are the report; the plot is a view of them
        print(f"qat: {e}; no report.png", file=sys.stderr)
        made = "json,md"
    log_wandb(recipes[0], report, out)
    print(table_md(report["rows"]))
    print(f"report: {out}/report.{{{made}}}")
    return report
