"""Quality study: every method on one data budget, at W4g128, W3g128 and W2g64, one table + plots.

For each bit width (``recipes/<scale>/quality/w*.yaml``, the "QAT + KD" recipe) this runs, through
``qat compare``'s own machinery (``qat.compare.compare_recipe``: run or reuse, same validation
blocks, same held-out tokens for the layer errors):

- the FP teacher, and the PTQ baselines RTN, GPTQ, AWQ, QERA-exact on GPTQ (``ptq.qera.base:
  gptq``), calibrated on the QAT run's training tokens (the same data budget);
- the QAT rows (``MAIN``): CE only, KD (the default recipe), KD with the other freeze policy than
  the bit width's default (ov-freeze at 4 bits and up, none below), and KD with min-max scales
  recomputed every step (no MSE clipping, no LSQ: what those two are worth);
- with ``--levers``, one lever at a time on top of the KD recipe (``levers``), at the bit widths
  given by ``--lever-bits``.

Writes ``<out>/report.{json,md,png}``: the table (ppl, ppl/FP, KL to the teacher, mean layer
output error per method and bit width), the levers as deltas against QAT + KD, the local-vs-global
section, and the plot (ppl/FP bars per method and bit width; mean layer output error against KL to
the teacher for every method and bit width on one axis). ``--append`` adds the tables to
``benchmarks/RESULTS.md``.

    python benchmarks/quality.py --scale tiny --levers --lever-bits W2g64      # CPU (~45 min, 1 core)
    python benchmarks/quality.py --scale small --bits W3g128                   # GPU (benchmarks/gpu_quality.sh)
    python benchmarks/quality.py --scale small-cpu                             # llama-small on a 2-core CPU
    python benchmarks/quality.py --merge a/report.json b/report.json --out DIR # one report from parts
    python benchmarks/quality.py --scale tiny --smoke                          # every step, seconds each

Runs are reused when complete and made from the same recipe (``--rerun`` redoes them), so an
interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
BITS = ("W4g128", "W3g128", "W2g64")
PTQ = ["rtn", "rtn-mse", "gptq", "awq", "qera-exact"]
PTQ_CHOICES = [*PTQ, "block-ap"]  # block-ap: EfficientQAT's block-wise training (its own row, and the start of a lever)
BUDGET_CAP = 4_100_000  # the study's data budget: at most 4.1 M training tokens for every method

# QAT rows of the main table: overrides of the KD recipe. ctx: {"gptq": GPTQ run dir, "steps": max_steps}
MAIN = {
    "qat-ce": lambda ctx: ["distill.kd_weight=0", "distill.ce_weight=1"],  # the teacher only evaluates
    "qat-kd": lambda ctx: [],
    "qat-kd-ovfreeze": lambda ctx: ["freeze.policy=ov-freeze"],  # a row where it is not the default (below 4 bits)
    "qat-kd-no-freeze": lambda ctx: ["freeze.policy=none"],  # a row where ov-freeze is the default (4 bits and up)
    # min-max qparams recomputed every step: what MSE-searched clipping as the start and
    # LSQ-trained scales are worth
    "qat-kd-old-defaults": lambda ctx: ["quant.scale_init=minmax", "quant.learnable=false"],
}
# The PTQ rows keep min-max scales (the observers of the llm-compressor GPTQ / AWQ runs they were
# checked against; AWQ searches its own clipping); `rtn-mse` is RTN with qat's MSE clip search.
PTQ_BASE = ["quant.scale_init=minmax"]


def levers(ctx: dict) -> dict[str, list[str]]:
    """One lever at a time on top of QAT + KD (the bit width's defaults, `ctx`: its learnable and symmetric)."""
    n = max(4, ctx["steps"])
    learnable, symmetric, grid = ctx["learnable"], ctx["symmetric"], ctx["grid"]  # the defaults at this bit width
    out = {
        "dynamic scales (no LSQ)" if learnable else "learnable (LSQ) scales": [f"quant.learnable={str(not learnable).lower()}"],
        "min-max scale init": ["quant.scale_init=minmax"],
        "asymmetric grid" if symmetric else "symmetric grid": [f"quant.symmetric={str(not symmetric).lower()}"],
        "integer grid" if grid == "seq" else "seq grid (ParetoQ)": ["quant.grid=int"] if grid == "seq" else ["quant.grid=seq", "quant.symmetric=false"],
        "init from gptq (latent)": [f"quant.init_from={ctx['gptq']}"],
        "kd temperature 2": ["distill.temperature=2"],
        "kd loss jsd": ["distill.loss=jsd"],
        "kd loss cakld": ["distill.loss=cakld"],
        "lr x3 (9e-4)": ["train.lr=9e-4"],
        "constant lr": ["train.schedule=constant"],
        f"fake-quant from step {n // 4}": [f"quant.start_step={n // 4}"],
        f"ov-freeze from step {n // 2}": ["freeze.policy=ov-freeze", f"freeze.start_step={n // 2}"],
    }
    if learnable:
        out["lsq gradient scale"] = ["quant.lsq_grad_scale=true"]
        out["ov-freeze weights only (scales train)"] = ["freeze.policy=ov-freeze", "freeze.scales=false"]
    if ctx.get("block-ap"):  # EfficientQAT: Block-AP, then end-to-end QAT
        out["init from block-ap (latent)"] = [f"quant.init_from={ctx['block-ap']}"]
    return out


SMOKE = [  # every step of the study in seconds (CPU): tiny budgets, not a measurement
    "train.max_steps=2", "train.warmup_steps=1", "train.micro_batch_size=2", "data.seq_len=128",
    "data.max_train_tokens=2048", "data.max_valid_tokens=1024", "eval.batch_size=4", "ptq.diag_tokens=512",
    "ptq.awq.search_tokens=512", "ptq.batch_size=4", "train.mixed_precision=no",
]


# llama-small on a CPU budget: 60 steps x 8 x 512 = 245,760 training tokens for every method (QAT,
# and the calibration of RTN / GPTQ / AWQ / QERA), fp32 (bf16 matmuls are slow on a CPU), the first
# 65,536 validation tokens
SMALL_CPU = [
    "train.max_steps=60", "train.micro_batch_size=8", "train.warmup_steps=6", "train.mixed_precision=no", "teacher.dtype=float32",
    "data.max_valid_tokens=65536", "eval.batch_size=8", "eval.every=0", "ptq.batch_size=8",
]
SCALES = {"tiny": ("tiny", []), "small": ("small", []), "small-cpu": ("small", SMALL_CPU)}  # --scale: recipes, overrides


def recipe_file(scale: str, label: str) -> str:
    return f"recipes/{SCALES[scale][0]}/quality/{label.lower()}.yaml"


def budget(recipe) -> int:
    t = recipe.train
    return t.max_steps * t.micro_batch_size * t.grad_accum * recipe.data.seq_len


def run_bits(
    scale: str, label: str, overrides: list[str], root: Path, with_levers: bool, rerun: bool, only: list[str] | None,
    ptq: list[str], levers_only: bool = False, naive: bool = False, seeds: list[int] | None = None,
) -> dict:
    """Every row at one bit width: ``compare_recipe`` parts merged, QAT rows named by variant."""
    from qat.compare import compare_recipe
    from qat.recipe import load_recipe

    f = recipe_file(scale, label)
    overrides = SCALES[scale][1] + overrides
    base = load_recipe(f, overrides + PTQ_BASE + [f"output_dir={root}/{label}/base", f"ptq.methods=[{','.join(ptq)}]"])
    tokens = budget(base)
    if scale == "small" and tokens > BUDGET_CAP:
        raise SystemExit(f"{f}: {tokens} training tokens, over the study's budget of {BUDGET_CAP}")
    print(f"== {label}: {tokens:,} training tokens per QAT run = PTQ calibration budget", flush=True)
    merged = compare_recipe(base, rerun=rerun, with_qat=False)  # FP + PTQ
    for r in merged["rows"]:
        r["method"] = r["method"] if r["method"].startswith("fp") else r["method"] + (" (gptq base)" if r["method"].startswith("qera") else "")
    merged["layer_errors"] = {(m + " (gptq base)" if m.startswith("qera") else m): e for m, e in merged["layer_errors"].items()}
    ctx = {
        "gptq": f"{root}/{label}/base-ptq-gptq", "steps": base.train.max_steps, "learnable": base.quant.learnable, "symmetric": base.quant.symmetric,
        "grid": base.quant.grid, "freeze": base.freeze.policy,
        "block-ap": f"{root}/{label}/base-ptq-block-ap" if "block-ap" in ptq else None,
    }
    variants = {} if levers_only else {k: v(ctx) for k, v in MAIN.items()}
    variants = {k: v for k, v in variants.items() if v != [f"freeze.policy={ctx['freeze']}"]}  # the default row itself
    if with_levers:
        variants.update({f"lever: {k}": v for k, v in levers(ctx).items()})
    if only:  # a full variant name selects that variant; any other word, the variants that contain it
        variants = {k: v for k, v in variants.items() if k in only or any(o in k for o in only if o not in variants)}
    for seed in seeds or []:  # the spread of the deciding rows: the default recipe again on other seeds
        variants[f"qat-kd seed{seed}"] = [f"train.seed={seed}"]
    for name, extra in variants.items():
        slug = name.replace("lever: ", "lever-").replace(" ", "-").replace("(", "").replace(")", "").replace(".", "").replace("+", "")
        r = load_recipe(f, overrides + [f"output_dir={root}/{label}/{slug}", "ptq.methods=[]", *extra])
        print(f"-- {label} {name}: {' '.join(extra) or '(the recipe as is)'}", flush=True)
        part = compare_recipe(r, rerun=rerun, with_qat=True)
        for row in part["rows"]:
            if row["method"] == "qat":
                row["method"], row["overrides"] = name, extra
                merged["rows"].append(row)
        merged["layer_errors"][name] = part["layer_errors"]["qat"]
    if naive:  # benchmarks/naive_qat.py on the same recipe, data and budget
        from naive_qat import run as naive_run

        print(f"-- {label} naive floor", flush=True)
        nv = naive_run(f, root / label / "naive", overrides)
        fp = next(r for r in merged["rows"] if r["method"].startswith("fp"))
        merged["rows"].append({
            "recipe": label, "method": "naive floor", "bits": base.quant.bits, "group_size": base.quant.group_size,
            "bits_per_weight": None, "ppl": nv["ppl"], "ppl_ratio": nv["ppl"] / fp["ppl"], "kl_to_teacher": nv["kl_to_teacher"],
            "mean_layer_error": None, "data_tokens": nv["train_tokens"], "wall_time_s": nv["wall_time_s"], "quant_time_s": None,
            "eval_tokens": nv["eval_tokens"], "run_dir": str(root / label / "naive"), "reused": False,
        })
    return merged


# -- report -------------------------------------------------------------------------------------
def _f(v, spec):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def pivot_md(rows: list[dict]) -> str:
    """method x bit width: ppl/FP, KL, mean layer error."""
    labels = list(dict.fromkeys(r["recipe"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows if not r["method"].startswith("lever")))
    head = "| method | " + " | ".join(f"{lab} ppl | {lab} ppl/FP | {lab} KL | {lab} layer err" for lab in labels) + " |"
    out = [head, "|---" * (1 + 4 * len(labels)) + "|"]
    for m in methods:
        cells = []
        for lab in labels:
            r = next((r for r in rows if r["recipe"] == lab and r["method"] == m), None)
            cells += ["–"] * 4 if r is None else [_f(r["ppl"], ".3f"), _f(r["ppl_ratio"], ".4f"), _f(r["kl_to_teacher"], ".4f"), _f(r["mean_layer_error"], ".4f")]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def levers_md(rows: list[dict]) -> str:
    """Each lever against QAT + KD at the same bit width: ppl/FP and KL, and the change."""
    out = ["| bits | lever (on top of QAT + KD) | overrides | ppl/FP | Δ ppl/FP vs KD | KL | Δ KL vs KD |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["method"].startswith("lever"):
            continue
        kd = next((k for k in rows if k["recipe"] == r["recipe"] and k["method"] == "qat-kd"), None)
        d_ppl = None if kd is None else r["ppl_ratio"] - kd["ppl_ratio"]
        d_kl = None if kd is None or r["kl_to_teacher"] is None else r["kl_to_teacher"] - kd["kl_to_teacher"]
        out.append(
            f"| {r['recipe']} | {r['method'][len('lever: '):]} | `{' '.join(r.get('overrides') or [])}` | {_f(r['ppl_ratio'], '.4f')} "
            f"| {_f(d_ppl, '+.4f')} | {_f(r['kl_to_teacher'], '.4f')} | {_f(d_kl, '+.4f')} |"
        )
    return "\n".join(out) if len(out) > 2 else ""


def write_report(report: dict, out: Path) -> None:
    from qat.compare import report_md, report_png

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    md = [
        "# Quality study",
        "",
        f"{report['date']} · {report['device']} · {report['command']}",
        "",
        "## ppl/FP, KL to the teacher, mean layer output error (method x bit width)",
        "",
        pivot_md(report["rows"]),
        "",
    ]
    lev = levers_md(report["rows"])
    if lev:
        md += ["## Levers, one at a time on top of QAT + KD", "", lev, ""]
    md += [report_md(report).split("\n", 1)[1]]  # qat compare's long table, local vs global, per-layer errors
    (out / "report.md").write_text("\n".join(md))
    try:
        report_png(report, out / "report.png", value="ppl_ratio")
    except ImportError:
        print("matplotlib is not installed (pip install 'qat[plot]'): no report.png")


def device_name() -> str:
    from ptq_compare import device_name as name

    return name()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=list(SCALES), default="tiny")
    ap.add_argument("--bits", nargs="+", default=list(BITS), choices=BITS)
    ap.add_argument("--levers", action="store_true", help="also the lever sweep (one lever at a time on top of KD)")
    ap.add_argument("--lever-bits", nargs="+", default=None, choices=BITS, help="bit widths of the sweep (default: --bits)")
    ap.add_argument("--levers-only", action="store_true", help="with --levers: the sweep without the main QAT rows")
    ap.add_argument("--ptq", nargs="+", default=PTQ, choices=PTQ_CHOICES, help="PTQ baselines (gptq is what 'init from gptq' starts from)")
    ap.add_argument("--only", nargs="+", default=None, help="QAT variants: a full name selects that variant, another word those whose name contains it (the PTQ rows always run)")
    ap.add_argument("--naive", action="store_true", help="also the naive floor (benchmarks/naive_qat.py) at every bit width")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="the QAT + KD row again with these train.seed values (the spread)")
    ap.add_argument("--smoke", action="store_true", help="tiny budgets: checks every step runs, measures nothing")
    ap.add_argument("--runs-root", default=None, help="default runs/quality-<scale>[-smoke]")
    ap.add_argument("--out", default=None, help="report directory (default <runs-root>/report)")
    ap.add_argument("--rerun", action="store_true")
    ap.add_argument("--merge", nargs="+", default=None, metavar="REPORT_JSON", help="only merge these reports into --out")
    ap.add_argument("--append", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    ap.add_argument("extra", nargs="*", help="more dotted.key=value overrides for every run")
    args = ap.parse_args()
    import os

    os.chdir(REPO)
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        report = {**parts[0], "command": command + "  [merged: " + "; ".join(p["command"] for p in parts) + "]",
                  "rows": [r for p in parts for r in p["rows"]], "recipes": [x for p in parts for x in p["recipes"]]}
        out = Path(args.out or "runs/quality-merged")
    else:
        root = Path(args.runs_root or f"runs/quality-{args.scale}{'-smoke' if args.smoke else ''}")
        overrides = (SMOKE if args.smoke else []) + list(args.extra)
        t0 = time.perf_counter()
        parts = []
        for label in args.bits:
            sweep = args.levers and (args.lever_bits is None or label in args.lever_bits)
            parts.append(run_bits(args.scale, label, overrides, root, sweep, args.rerun, args.only, args.ptq, args.levers_only, args.naive, args.seeds))
        report = {
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "device": device_name(),
            "command": command,
            "recipe_files": [recipe_file(args.scale, b) for b in args.bits],
            "rows": [r for p in parts for r in p["rows"]],
            "recipes": parts,
            "wall_time_s": time.perf_counter() - t0,
        }
        out = Path(args.out or root / "report")
    write_report(report, out)
    text = (out / "report.md").read_text().split("## Local vs global", 1)[0]
    print(text)
    print(f"report: {out}/report.{{json,md,png}}")
    if args.append:
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as fh:
            fh.write("\n" + text.replace("# Quality study", f"## Quality study ({report['date'][:10]}, benchmarks/quality.py)", 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
