"""The naive QAT floor: the simplest QAT anyone would write, on a recipe's own data and budget.

Per-group absmax fake-quant of every Linear weight but lm_head, recomputed from the weight at
every forward (scale = absmax / (2^(b-1) - 1), codes in [-(2^(b-1) - 1), 2^(b-1) - 1]); a plain
straight-through estimator (the gradient passes everywhere: absmax clips nothing); forward KL to
the frozen teacher; AdamW with the recipe's lr, warmup and schedule. Nothing of qat's
quantization code is used (no shared grid, no LSQ, no clipping search, no freezing): only the
recipe, the data blocks and batch order (the same global batches as ``qat train``), qat's
learning-rate schedule (``qat.train.optim.lr_at``) and KD loss (``qat.distill.kd_loss``), and the
evaluation (``qat.evaluate.perplexity`` on the same validation blocks, KL to the same teacher).

    python benchmarks/naive_qat.py recipes/small/quality/w2g64.yaml OUT_DIR [key=value ...]

Writes ``OUT_DIR/naive.json``: ppl, ppl/FP, KL to the teacher, tokens, wall time. A finished
OUT_DIR with the same recipe is reused (``--rerun`` redoes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def absmax_fake_quant(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Symmetric per-group absmax fake-quant with a plain STE (identity gradient)."""
    qmax = 2 ** (bits - 1) - 1
    wg = w.reshape(w.shape[0], -1, group_size)
    scale = wg.detach().abs().amax(-1, keepdim=True).clamp(min=1e-8) / qmax
    q = (torch.round(wg / scale).clamp(-qmax, qmax) * scale).reshape(w.shape)
    return w + (q - w).detach()


class NaiveQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, bits: int, group_size: int):
        super().__init__()
        self.weight, self.bias, self.bits, self.group_size = linear.weight, linear.bias, bits, group_size

    def forward(self, x):
        return F.linear(x, absmax_fake_quant(self.weight, self.bits, self.group_size), self.bias)


def wrap(model: nn.Module, bits: int, group_size: int) -> int:
    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not full.endswith("lm_head"):
                setattr(module, child_name, NaiveQuantLinear(child, bits, group_size))
                n += 1
    return n


def _used(d: dict) -> dict:
    """The recipe keys this script reads (a finished run is reused when they are unchanged)."""
    q, t = d.get("quant") or {}, d.get("train") or {}
    return {
        "model": (d.get("model") or {}).get("path"), "teacher": (d.get("teacher") or {}).get("dtype"),
        "quant": (q.get("bits"), q.get("group_size")), "data": d.get("data"), "eval": d.get("eval"),
        "train": {k: t.get(k) for k in ("lr", "betas", "eps", "warmup_steps", "max_steps", "micro_batch_size", "grad_accum", "grad_clip", "seed")},
    }


def run(recipe_file: str, out: Path, overrides: list[str], rerun: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    from qat.data.corpus import build_datasets
    from qat.data.plans import BatchPlan, batch_of
    from qat.distill import kd_loss
    from qat.evaluate.perplexity import perplexity
    from qat.io.models import load_tokenizer
    from qat.recipe import load_recipe
    from qat.train.optim import lr_at

    recipe = load_recipe(recipe_file, [f"output_dir={out}", *overrides])
    result_file = out / "naive.json"
    if result_file.exists() and not rerun:
        done = json.loads(result_file.read_text())
        if _used(done.get("recipe") or {}) == _used(recipe.to_dict()):
            return done
    t, q = recipe.train, recipe.quant
    torch.manual_seed(t.seed)
    tokenizer = load_tokenizer(recipe)
    train_set, valid_set = build_datasets(recipe.data, tokenizer, seed=t.seed)
    student = AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=getattr(torch, recipe.teacher.dtype)).eval().requires_grad_(False)
    n_layers = wrap(student, q.bits, q.group_size)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=0.0)
    plan = BatchPlan(len(train_set), t.micro_batch_size, 1, 0, t.seed)
    t0 = time.perf_counter()
    student.train()
    losses = []
    for step in range(t.max_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, recipe, t.max_steps)
        total = 0.0
        for micro in range(t.grad_accum):
            _, idx = plan.indices(step * t.grad_accum + micro)
            batch = batch_of(train_set, idx, "cpu")
            with torch.no_grad():
                t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = kd_loss(s_logits, t_logits, batch["labels"]) / t.grad_accum  # forward KL, mean over real tokens
            loss.backward()
            total += loss.item()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(student.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        if (step + 1) % max(1, t.max_steps // 10) == 0:
            print(f"naive {q.bits}-bit step {step + 1}/{t.max_steps}: kd {total:.4f}", flush=True)
    train_s = time.perf_counter() - t0
    ev = perplexity(student, valid_set, recipe.eval.batch_size, recipe.eval.max_batches, teacher=teacher, desc="eval naive")
    result = {
        "recipe": recipe.to_dict(),
        "quantized_layers": n_layers,
        "ppl": ev["ppl"],
        "fp_ppl": ev["teacher_ppl"],
        "ppl_ratio": ev["ppl"] / ev["teacher_ppl"],
        "kl_to_teacher": ev["kl_to_teacher"],
        "eval_tokens": ev["tokens"],
        "train_tokens": t.max_steps * t.grad_accum * t.micro_batch_size * recipe.data.seq_len,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "wall_time_s": train_s,
    }
    out.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=1))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("out")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--rerun", action="store_true")
    args = ap.parse_args()
    r = run(args.recipe, Path(args.out), args.overrides, args.rerun)
    print(json.dumps({k: v for k, v in r.items() if k != "recipe"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
