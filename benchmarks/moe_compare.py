"""QAT vs layerwise PTQ on a trained MoE: W4g128, W3g128 and W2g64, with the experts' share of the error.

1. pretrains the MoE teacher of ``recipes/quickstart/pretrain-moe.yaml`` (a Qwen3-MoE, 8 experts of
   which 2 per token, ~6M parameters, on the Python standard library's source) unless
   ``runs/quickstart/pretrain-moe/final`` exists;
2. runs ``qat compare recipes/quickstart/moe-qat.yaml`` at each width (RTN, GPTQ, AWQ and the
   default QAT with KD; PTQ calibrates on the QAT run's token budget);
3. per variant, the experts' share of the error: the KL to the teacher with every layer as the
   variant has it, and with the experts given back their FP weights (everything else as the
   variant has it); share = 1 - KL(experts FP) / KL(all).

Prints one table and appends it, dated, with the device and the reproduce command, to
``benchmarks/RESULTS.md`` (``--no-append`` to skip).

    python benchmarks/moe_compare.py
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
PRETRAIN = "recipes/quickstart/pretrain-moe.yaml"
RECIPE = "recipes/quickstart/moe-qat.yaml"
TEACHER = REPO / "runs/quickstart/pretrain-moe/final"
WIDTHS = [(4, 128), (3, 128), (2, 64)]


def qat(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "qat", *args], cwd=REPO, check=True)


def expert_share(run_dir: Path, blocks, batch_size: int, max_batches: int | None) -> dict:
    """KL to the teacher of ``run_dir/final`` as it is, and with its experts' FP weights back."""
    import torch
    from transformers import AutoModelForCausalLM

    from qat.evaluate.perplexity import perplexity

    teacher = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).eval()
    full = perplexity(model, blocks, batch_size, max_batches, teacher=teacher)["kl_to_teacher"]
    fp = dict(teacher.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name and p.ndim == 3:
                p.copy_(fp[name])
    experts_fp = perplexity(model, blocks, batch_size, max_batches, teacher=teacher)["kl_to_teacher"]
    return {"kl": full, "kl_experts_fp": experts_fp, "expert_share": 1 - experts_fp / full if full > 0 else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-append", action="store_true", help="print the table only")
    args = ap.parse_args()
    t0 = time.time()
    if not (TEACHER / "config.json").is_file():
        qat("train", PRETRAIN)
    pretrain_s = time.time() - t0

    from qat.data import build_datasets
    from qat.io.models import load_tokenizer
    from qat.recipe import load_recipe

    rows, times = [], {}
    for bits, g in WIDTHS:
        out = f"runs/quickstart/moe-w{bits}g{g}"
        t = time.time()
        qat("compare", RECIPE, f"output_dir={out}", f"quant.bits={bits}", f"quant.group_size={g}", "tracking.wandb_project=null")
        times[f"W{bits}g{g}"] = time.time() - t
        report = json.loads((REPO / f"{out}-compare" / "report.json").read_text())
        recipe = load_recipe(REPO / RECIPE, [f"output_dir={out}"])
        _, valid = build_datasets(recipe.data.model_copy(update={"max_train_tokens": recipe.data.seq_len}), load_tokenizer(recipe), seed=recipe.train.seed)
        for r in report["rows"]:
            if r["run_dir"] is None:
                continue
            share = expert_share(Path(r["run_dir"]), valid, recipe.eval.batch_size, recipe.eval.max_batches)
            rows.append({"width": f"W{bits}g{g}", "method": r["method"], "ppl": r["ppl"], "ppl_ratio": r["ppl_ratio"], **share,
                         "fp_ppl": r["ppl"] / r["ppl_ratio"]})
    table = ["| width | method | ppl | ppl / FP | KL to FP | KL, experts FP | experts' share of the KL |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['width']} | {r['method']} | {r['ppl']:.3f} | {r['ppl_ratio']:.4f} | {r['kl']:.4f} | {r['kl_experts_fp']:.4f} | "
                     f"{100 * r['expert_share']:.0f}% |")
    best = []
    for w in {r["width"] for r in rows}:
        ptq = min((r for r in rows if r["width"] == w and r["method"] != "qat"), key=lambda r: r["ppl"])
        q = next(r for r in rows if r["width"] == w and r["method"] == "qat")
        best.append(f"{w}: QAT {q['ppl']:.3f} vs best PTQ ({ptq['method']}) {ptq['ppl']:.3f}: {'below' if q['ppl'] < ptq['ppl'] else 'NOT below'}")
    text = "\n".join(table) + "\n\n" + "\n".join(sorted(best))
    print(text)
    print(f"wall time: pretrain {pretrain_s:.0f} s, " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    if not args.no_append:
        import torch

        import qat as qat_pkg

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        entry = (f"\n## MoE: QAT vs PTQ on a trained Qwen3-MoE ({datetime.date.today()})\n\n"
                 f"Device: {device}; qat {qat_pkg.__version__}, torch {torch.__version__}. "
                 f"Teacher: `{PRETRAIN}` (FP ppl {rows[0]['fp_ppl']:.3f}); QAT and PTQ: `{RECIPE}` at each width, "
                 f"the QAT run's token budget for every method. Experts' share: 1 - KL with the experts' FP weights "
                 f"back / KL as quantized.\n\nReproduce: `python benchmarks/moe_compare.py`\n\n{text}\n\n"
                 f"Wall time: pretrain {pretrain_s:.0f} s, " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + "\n")
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(entry)


if __name__ == "__main__":
    main()
