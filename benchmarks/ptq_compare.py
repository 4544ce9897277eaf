"""QAT vs layerwise PTQ on the llama-small fixture at W4g128, W3g128 and W2g64.

Runs ``qat compare`` on ``recipes/small/{w4g128,w3g128,w2g64}.yaml`` (one report covering the
three bit widths) and appends the table, the wall times, the date and the device to
``benchmarks/RESULTS.md`` (append only).

    python benchmarks/ptq_compare.py            # GPU: the recipes' own QAT budget
    python benchmarks/ptq_compare.py --cpu      # CPU: reduced budget, see CPU_OVERRIDES

On a CPU the QAT budget is cut through overrides (``train.max_steps=30``: 30 x 16 x 512 =
245,760 tokens, which is then also every PTQ method's calibration budget), evaluation uses the
first ``eval.max_batches=8`` batches (65,536 validation tokens) and AWQ's scale search runs on
16,384 of the calibration tokens; the output says so. QERA's rank is set to 8 for the 384-wide
llama-small (rank 32 would add more than 2 bits per weight); the report's bits/weight column
shows what the correction costs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["recipes/small/w4g128.yaml", "recipes/small/w3g128.yaml", "recipes/small/w2g64.yaml"]
COMMON = ["ptq.methods=[rtn,gptq,awq,qera-exact]", "ptq.qera.rank=8", "tracking.wandb_project=null"]
CPU_OVERRIDES = [
    "train.max_steps=30",
    "eval.every=0",
    "checkpoint.every=0",
    "eval.max_batches=8",
    "ptq.awq.search_tokens=16384",
]


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="reduced budget for a CPU (see the module doc)")
    ap.add_argument("--runs-root", default=None, help="default: runs/bench-ptq-{cpu,gpu}")
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--rerun", action="store_true")
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("extra", nargs="*", help="more dotted.key=value overrides")
    args = ap.parse_args()

    root = args.runs_root or f"runs/bench-ptq-{'cpu' if args.cpu else 'gpu'}"
    overrides = COMMON + (CPU_OVERRIDES if args.cpu else []) + args.extra
    cmd = [sys.executable, "-m", "qat", "compare", *args.recipes, *overrides, "--runs-root", root, "--out", f"{root}/compare"]
    if args.rerun:
        cmd.append("--rerun")
    print("running:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.perf_counter() - t0

    report = json.loads((REPO / root / "compare" / "report.json").read_text())
    md = (REPO / root / "compare" / "report.md").read_text()
    table = md.split("\n\n")[3] if md.count("\n\n") >= 3 else md
    table = next((part for part in md.split("\n\n") if part.startswith("| recipe |")), table)
    rows = [r for r in report["rows"] if r["wall_time_s"] is not None]
    times = ", ".join(f"{r['recipe']} {r['method']} {r['wall_time_s']:.0f} s" for r in rows)
    local = md.split("## Local vs global", 1)[1].split("## Per-layer", 1)[0].strip() if "## Local vs global" in md else ""
    section = [
        "",
        f"## PTQ baselines vs QAT, llama-small ({datetime.date.today().isoformat()}, benchmarks/ptq_compare.py)",
        "",
        f"Device: {device_name()}. Command: `{' '.join(['qat', 'compare', *args.recipes, *overrides, '--runs-root', root])}`.",
        "",
        (
            "**Reduced CPU budget**: QAT for 30 steps (30 x 16 x 512 = 245,760 tokens instead of the recipes' 4.1 M), "
            "so every PTQ method calibrates on the same 245,760 tokens; evaluation on the first 8 batches "
            "(65,536 validation tokens); AWQ scale search on 16,384 of the calibration tokens; QERA rank 8."
            if args.cpu
            else "The recipes' own QAT budget (500 x 16 x 512 tokens) = every PTQ method's calibration budget; QERA rank 8."
        ),
        "",
        table,
        "",
        f"Wall time per run (load + quantize or train + evaluate): {times}. Whole benchmark: {wall / 60:.1f} min.",
        "",
        "Local vs global (mean layer output error vs KL to the teacher):",
        "",
        local,
        "",
    ]
    text = "\n".join(section)
    print(text)
    if not args.no_append:
        results = REPO / "benchmarks" / "RESULTS.md"
        if not results.exists():
            results.write_text("# Benchmark results\n\nAppend-only log; newest sections at the end.\n")
        with open(results, "a") as f:
            f.write(text)
        print(f"appended to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
