"""CVXQ bit allocation vs uniform bits at the same average, after RTN and GPTQ (``qat ptq``).

For each model (``../shared`` llama-tiny, llama-small) and target average (3.0, 2.5 code bits per
weight), on the recipe's group size (tiny g64, small g128), symmetric:

- ``cvxq``: ``qat analyze bits`` (d = G^2 S^2, gradients of the FP model over 16 calibration
  sequences);
- ``s2-only``: the same solver with G^2 = 1 (weight variance only), an ablation of the gradient term;
- ``uniform``: every layer at the target (3.0), or at the integers bracketing it (2.5 -> W2, W3:
  uniform 2.5 does not exist on the {2, 3, 4, 8} grid).

Each allocation is written as a recipe (``qat.analyze.report.allocation_recipe``) and quantized with
``qat ptq --method rtn`` and ``--method gptq``; perplexity of ``final/`` on the recipe's validation
split (first ``--valid-tokens`` tokens), bits per weight with the bf16 scales (``eval.json``).

    OMP_NUM_THREADS=1 python benchmarks/bitalloc.py [--models tiny small] [--avg 3.0 2.5] [--append]

Runs on CPU or GPU as is (``qat ptq`` picks cuda when there is one); ``--append`` adds the table,
the commands and the device to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repository's qat (as the other benchmarks do)
MODELS = {
    "tiny": ("recipes/tiny/w4-ovfreeze.yaml", 16384),  # recipe (group size), GPTQ calibration tokens
    "small": ("recipes/small/w3g128.yaml", 32768),
}
COMMON = ["teacher=null", "distill.ce_weight=1.0", "freeze.policy=none", "tracking.wandb_project=null", "eval.max_batches=null"]


def main() -> int:
    import numpy as np
    import torch

    from qat.analyze.bitalloc import allocate, layer_stats
    from qat.analyze.setup import load_setup
    from qat.analyze.report import allocation_recipe
    from qat.evaluate.perplexity import perplexity
    from qat.ptq import run_ptq
    from qat.recipe import load_recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--avg", nargs="+", type=float, default=[3.0, 2.5])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    ap.add_argument("--valid-tokens", type=int, default=32768)
    ap.add_argument("--out", default="runs/bench-bitalloc")
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()

    rows, t0 = [], time.perf_counter()
    for model_key in args.models:
        recipe_path, calib_tokens = MODELS[model_key]
        base = load_recipe(REPO / recipe_path, [*COMMON, "quant.bits=3", f"data.max_valid_tokens={args.valid_tokens}",
                                                "data.max_train_tokens=262144", f"ptq.calib_tokens={calib_tokens}"])
        t = time.perf_counter()
        setup = load_setup(base, 16, args.valid_tokens)
        fp = perplexity(setup.model, setup.valid, base.eval.batch_size)
        stats = layer_stats(setup, 4)
        stat_s = time.perf_counter() - t
        plan = setup.plan
        del setup
        names = [s["name"] for s in stats]
        n = np.array([s["n_params"] for s in stats], dtype=float)
        g2s2 = np.array([s["g2"] * s["s2"] for s in stats])
        s2 = np.array([s["s2"] for s in stats])
        print(f"{model_key}: FP ppl {fp['ppl']:.3f} on {fp['tokens']} tokens; G^2/S^2 statistics in {stat_s:.1f} s")
        rows.append({"model": model_key, "target": "-", "alloc": "FP", "avg_bits": 32.0, "bpw": None, "mix": "-",
                     **{m: fp["ppl"] for m in args.methods}})
        done: dict[tuple, dict] = {}
        for avg in args.avg:
            variants = [("cvxq", allocate(g2s2, n, avg).bits), ("s2-only", allocate(s2, n, avg).bits)]
            if float(avg).is_integer():
                variants.append(("uniform", np.full(len(n), int(avg))))
            else:
                variants += [("uniform", np.full(len(n), math.floor(avg))), ("uniform", np.full(len(n), math.ceil(avg)))]
            for label, bits in variants:
                key = tuple(int(b) for b in bits)
                bits_by = dict(zip(names, key))
                avg_used = float(np.dot(bits, n) / n.sum())
                row = {"model": model_key, "target": avg, "alloc": label, "avg_bits": avg_used,
                       "mix": " ".join(f"W{b}:{float(n[np.array(key) == b].sum() / n.sum()):.2f}" for b in sorted(set(key)))}
                if key in done:
                    rows.append({**done[key], "target": avg, "alloc": label})
                    continue
                tag = f"{model_key}-{label}-{avg:g}-{'u' + str(key[0]) if label == 'uniform' else ''}".rstrip("-")
                recipe, _ = allocation_recipe(base, bits_by, plan, avg)
                for method in args.methods:
                    out = run_ptq(recipe, method, REPO / args.out / f"{tag}-{method}", overwrite=True)
                    ev = json.loads((out / "eval.json").read_text())
                    row[method] = ev["student"]["ppl"]
                    row["bpw"] = ev["bits_per_weight"]
                    row[f"{method}_s"] = ev["wall_time_s"]
                done[key] = row
                rows.append(row)
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
    total = time.perf_counter() - t0
    table = table_md(rows, args.methods)
    print(table)
    print(f"total wall time {total:.0f} s")
    if args.append:
        append_results(table, args, total)
    return 0


def table_md(rows: list[dict], methods: list[str]) -> str:
    head = "| model | target avg | allocation | code bits/weight | bits/weight incl. bf16 scales | mix (share of weights) | " + " | ".join(f"{m.upper()} ppl" for m in methods) + " |"
    out = [head, "|---|---|---|---|---|---|" + "---|" * len(methods)]
    for r in rows:
        bpw = "-" if r.get("bpw") is None else f"{r['bpw']:.3f}"
        avg = "-" if r["alloc"] == "FP" else f"{r['avg_bits']:.3f}"
        out.append(f"| {r['model']} | {r['target']} | {r['alloc']} | {avg} | {bpw} | {r['mix']} | " + " | ".join(f"{r[m]:.3f}" for m in methods) + " |")
    return "\n".join(out)


def append_results(table: str, args, total: float) -> None:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    cmd = "OMP_NUM_THREADS=1 python benchmarks/bitalloc.py " + " ".join(sys.argv[1:])
    text = (
        f"\n## CVXQ bit allocation vs uniform bits, RTN and GPTQ (benchmarks/bitalloc.py, {datetime.date.today()})\n\n"
        f"Device: {device}. Command: `{cmd}` (total {total / 60:.1f} min).\n\n{table}\n"
    )
    with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
