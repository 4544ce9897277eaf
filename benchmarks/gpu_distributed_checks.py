"""Checks for benchmarks/gpu_distributed.sh (GPU only; each prints one JSON line and exits 1 on failure).

    python benchmarks/gpu_distributed_checks.py final RUN [--frozen-like RUN0]
    python benchmarks/gpu_distributed_checks.py compare RUN_A RUN_B --loss-rtol R --ppl-rtol R [--from-step N]
    accelerate launch ... benchmarks/gpu_distributed_checks.py probe RECIPE [dotted.key=value ...]
    python benchmarks/gpu_distributed_checks.py make-1b DIR --tokenizer TOKDIR

``final``: final/ loads with plain transformers, every quantized layer is exactly on its integer
grid (codes in range, weight == dequantized codes), and with ``--frozen-like`` the ov-frozen
layers equal those of another run's final/ (a ``train.max_steps=0`` run: the RTN start).
``compare``: two runs logged the same steps; the largest relative difference of the per-step
loss and of the final validation perplexity stay under the given tolerances.
``probe``: run under ``accelerate launch`` with FSDP2: set up student and teacher exactly as
``qat.train`` does, then check that both are sharded (DTensor parameters), that every fake-quant
forward sees the full all-gathered weight, that one KD step gives a finite loss and a global
gradient norm, and that the gathered full state dict has full shapes.
``make-1b``: a randomly initialised ~1B-parameter Llama (hidden 2048, 16 layers, 32 heads,
8 KV heads, MLP 8192, vocab 8192, 2048 positions) saved in bf16 with the fixture tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch


def emit(ok: bool, **info) -> int:
    print(json.dumps({"ok": ok, **info}, default=str))
    return 0 if ok else 1


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run / "final", dtype="auto").state_dict()  # loads with plain transformers


def check_final(run: Path, frozen_like: Path | None) -> int:
    from safetensors.torch import load_file

    from qat.quant.grid import dequantize, quantize

    final = run / "final"
    state = _final_state(run)
    layers = json.loads((final / "qat_quant.json").read_text())["layers"]
    qparams = load_file(str(final / "qat" / "qparams.safetensors"))
    off_grid = []
    for name, info in layers.items():
        w = state[f"{name}.weight"]
        scale, zero = qparams[f"{name}.weight_scale"], qparams[f"{name}.weight_zero_point"]
        codes = quantize(w.to(scale.dtype), scale, zero, info["bits"], info["symmetric"], info["group_size"])
        qmin, qmax = (-(2 ** (info["bits"] - 1)), 2 ** (info["bits"] - 1) - 1) if info["symmetric"] else (0, 2 ** info["bits"] - 1)
        in_range = codes.min() >= qmin and codes.max() <= qmax
        if not in_range or not torch.equal(dequantize(codes, scale, zero, info["group_size"], w.dtype), w):
            off_grid.append(name)
    frozen = [n for n, v in layers.items() if v["frozen"]]
    frozen_diff = []
    if frozen_like is not None:
        ref = _final_state(frozen_like)
        frozen_diff = [n for n in frozen if not torch.equal(ref[f"{n}.weight"], state[f"{n}.weight"])]
    ev = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    ok = bool(layers) and not off_grid and not frozen_diff
    return emit(ok, check="final", run=str(run), quantized=len(layers), frozen=len(frozen), off_grid=off_grid[:5],
                frozen_changed=frozen_diff[:5], student_ppl=ev.get("student", {}).get("ppl"))


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def compare(a: Path, b: Path, loss_rtol: float, ppl_rtol: float, from_step: int) -> int:
    ra = {r["step"]: r for r in rows(a) if "loss" in r and r["step"] > from_step}
    rb = {r["step"]: r for r in rows(b) if "loss" in r and r["step"] > from_step}
    same_steps = sorted(ra) == sorted(rb) and bool(ra)
    loss_rel = max((abs(ra[s]["loss"] - rb[s]["loss"]) / abs(ra[s]["loss"]) for s in ra if s in rb), default=math.inf)
    ea, eb = (json.loads((r / "eval.json").read_text()) for r in (a, b))
    pa, pb = ea.get("student", {}).get("ppl"), eb.get("student", {}).get("ppl")
    ppl_rel = abs(pa - pb) / pa if pa and pb else None
    ok = same_steps and loss_rel <= loss_rtol and (ppl_rel is None or ppl_rel <= ppl_rtol)
    return emit(ok, check="compare", a=str(a), b=str(b), steps=len(ra), max_loss_rel_diff=loss_rel, loss_rtol=loss_rtol,
                ppl=[pa, pb], ppl_rel_diff=ppl_rel, ppl_rtol=ppl_rtol)


def probe(recipe_path: str, overrides: list[str]) -> int:
    """qat.train's setup under the launcher's FSDP2, then one KD step."""
    from accelerate.utils import DistributedType
    from torch.distributed.tensor import DTensor

    from qat.distill import kd_loss
    from qat.quant.linear import QATLinear
    from qat.recipe import load_recipe
    from qat.train.loop import _as_float
    from qat.train.optim import build_optimizer
    from qat.train.tracking import make_accelerator
    from qat.policy import build_student_quant
    from qat.io.models import load_models, load_tokenizer, model_config

    recipe = load_recipe(recipe_path, overrides)
    out = Path(recipe.output_dir)
    accelerator = make_accelerator(recipe, out)
    tokenizer = load_tokenizer(recipe, out, reuse_trained=True)
    config = model_config(recipe, tokenizer)
    student, teacher = load_models(recipe, config)
    build_student_quant(student, recipe)
    optimizer = build_optimizer(student, recipe)
    student, optimizer = accelerator.prepare(student, optimizer)
    teacher = accelerator.prepare_model(teacher, evaluation_mode=accelerator.distributed_type != DistributedType.FSDP)
    info = {"distributed_type": str(accelerator.distributed_type)}
    info["student_dtensor_frac"] = sum(isinstance(p, DTensor) for p in student.parameters()) / len(list(student.parameters()))
    info["teacher_dtensor_frac"] = sum(isinstance(p, DTensor) for p in teacher.parameters()) / len(list(teacher.parameters()))
    seen = []
    for name, m in student.named_modules():
        if isinstance(m, QATLinear):
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.append(
                (type(mod.weight).__name__, tuple(mod.weight.shape) == (mod.out_features, mod.in_features))))
    ids = torch.randint(0, config.vocab_size, (2, min(256, recipe.data.seq_len)), device=accelerator.device)
    student.train()
    logits = student(input_ids=ids).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    loss = kd_loss(logits, t_logits, ids)
    accelerator.backward(loss)
    trainable = [p for p in student.parameters() if p.requires_grad]
    norm = _as_float(accelerator.clip_grad_norm_(trainable, 1.0))
    optimizer.step()
    optimizer.zero_grad()
    state = accelerator.get_state_dict(student)
    info.update(loss=loss.item(), grad_norm=norm, fake_quant_calls=len(seen),
                fake_quant_saw_full_weight=all(full and kind != "DTensor" for kind, full in seen),
                peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
    if accelerator.is_main_process:
        full_shapes = all(not isinstance(v, DTensor) for v in state.values())
        info["gathered_keys"], info["gathered_full"] = len(state), full_shapes
        ok = (info["student_dtensor_frac"] > 0.9 and info["teacher_dtensor_frac"] > 0.9 and len(seen) > 0
              and info["fake_quant_saw_full_weight"] and math.isfinite(info["loss"]) and norm is not None
              and math.isfinite(norm) and full_shapes)
        code = emit(ok, check="probe", **info)
    else:
        code = 0
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return code


def make_1b(out: Path, tokenizer: Path) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=8192, max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer.iterdir():
        if f.is_file() and f.name not in ("config.json", "generation_config.json") and not f.name.endswith((".safetensors", ".index.json")):
            shutil.copy(f, out / f.name)
    return emit(n > 0.9e9, check="make-1b", dir=str(out), params=n)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("final")
    f.add_argument("run", type=Path)
    f.add_argument("--frozen-like", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--loss-rtol", type=float, required=True)
    c.add_argument("--ppl-rtol", type=float, required=True)
    c.add_argument("--from-step", type=int, default=0)
    pr = sub.add_parser("probe")
    pr.add_argument("recipe")
    pr.add_argument("overrides", nargs="*")
    m = sub.add_parser("make-1b")
    m.add_argument("dir", type=Path)
    m.add_argument("--tokenizer", type=Path, required=True)
    a = p.parse_args(argv)
    if a.cmd == "final":
        return check_final(a.run, a.frozen_like)
    if a.cmd == "compare":
        return compare(a.a, a.b, a.loss_rtol, a.ppl_rtol, a.from_step)
    if a.cmd == "probe":
        return probe(a.recipe, a.overrides)
    return make_1b(a.dir, a.tokenizer)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
