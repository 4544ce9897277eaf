"""Training-step time of plain fine-tuning vs QAT variants, measured side by side in one process.

Variants (each one optimizer step on the same batch, as in ``qat/train/loop.py``: forward under
autocast, ``qat.distill.distill_loss``, backward, grad-norm clip 1.0, AdamW step, zero_grad):

  plain          (a) fine-tuning, CE
  qat            (b) fake-quant W4 g128 (``qat.quant.quantize_model``, dynamic qparams), CE;
                     the fake-quant implementation is ``--kernel`` (auto: compiled on CUDA)
  qat-eager / qat-compile   (b) with the kernel forced (to compare the two)
  qat-kd         (c) (b) + teacher forward (frozen copy in --teacher-dtype) + forward-KL KD loss
  qat-kd-cached  (c-cached) (b) + KD from the teacher's top-k (``qat.distill.teacher_cache.teacher_topk``,
                     computed once before timing and kept on the device: the loss cost, not the disk read)
  qat-lora       (d) (b) with every quantized layer frozen on its grid + a LoRA adapter (``qat.train.lora.apply_lora``)
  torchao        torchao's QAT (IntxFakeQuantizeConfig int4 g128, ``quantize_``), CE, when torchao imports

Variants are timed round-robin (the starting variant rotates every round) after ``--warmup``
rounds; the median of ``--steps`` is reported. plain / qat / qat-kd / torchao share the same
parameter tensors and one AdamW (the timing does not depend on the weights' values), so one
process holds one copy of the model; qat-lora has its own frozen copy.

Memory (CUDA only): per variant, the peak allocated during its step above what was allocated
before it, plus the bytes of the tensors it keeps between steps (its parameters, their AdamW
state, its teacher), i.e. what the variant would hold running alone. On CPU: n/a.
MFU: model FLOPs = the plain step's (6 N + 12 L d s) per token (N = Linear weights incl. lm_head,
PaLM's convention), the same for every variant, over the step time and the device's dense bf16
peak (H100/H200: 989 TFLOP/s; --peak-tflops otherwise). On CPU the achieved GFLOP/s are printed.

    python benchmarks/step_time.py --config tiny                      # ../shared/models/llama-tiny, CPU
    python benchmarks/step_time.py --config small --results-md benchmarks/RESULTS.md
    python benchmarks/step_time.py --config 1b --device cuda --batch 4 --seq 2048   # random init ~0.95B
    python benchmarks/step_time.py --config smoke                     # seconds: checks every variant runs
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QAT_SHARED", REPO.parent / "shared"))  # gpu_throughput.sh: shared/ carried in the repo
sys.path.insert(0, str(REPO))

from qat.distill import distill_loss  # noqa: E402
from qat.quant import QuantScheme, fused, quantize_model  # noqa: E402
from qat.recipe import DistillSection, PeftSection  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
ALL_VARIANTS = ("plain", "qat", "qat-eager", "qat-compile", "qat-kd", "qat-kd-cached", "qat-lora", "torchao")
DEFAULT_VARIANTS = "plain,qat,qat-kd,qat-kd-cached,qat-lora,torchao"
# defaults per config: batch, seq, steps, warmup
CONFIGS = {
    "smoke": (2, 64, 2, 1),
    "tiny": (8, 256, 6, 2),
    "small": (4, 512, 5, 2),
    "1b": (4, 2048, 10, 3),
}


def llama_1b_config():
    """A ~0.95B Llama (random init): d 2048, 18 layers, 32 heads (8 KV), MLP 5632, vocab 32000."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
    )


def smoke_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False,
    )


def load_base(config_name: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if config_name in ("tiny", "small"):
        path = SHARED / "models" / f"llama-{config_name}"
        if not path.is_dir():
            raise SystemExit(f"--config {config_name}: {path} not found (the ../shared fixtures)")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    else:
        cfg = llama_1b_config() if config_name == "1b" else smoke_config()
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).train()


def share_params(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` that shares its parameter tensors (not its buffers)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


@dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    kernel: str = "eager"
    teacher: nn.Module | None = None
    topk: object | None = None
    times: list[float] = field(default_factory=list)
    mem_bytes: list[int] = field(default_factory=list)

    @property
    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]


def build_variants(names, args, device) -> tuple[dict[str, Variant], nn.Module, list[str]]:
    wdtype = DTYPES[args.weights]
    base = load_base(args.config, wdtype, device)
    scheme = QuantScheme(bits=4, group_size=args.group_size)
    shared_opt = torch.optim.AdamW(base.parameters(), lr=1e-6)  # plain/qat/kd/torchao train these tensors
    notes, out, qat_model, teacher = [], {}, None, None

    def qat_shared():
        nonlocal qat_model
        if qat_model is None:
            qat_model = share_params(base)
            quantize_model(qat_model, scheme)
        return qat_model

    def get_teacher():
        nonlocal teacher
        if teacher is None:
            teacher = copy.deepcopy(base).to(DTYPES[args.teacher_dtype]).eval().requires_grad_(False)
        return teacher

    for name in names:
        if name == "plain":
            out[name] = Variant(name, base, shared_opt)
        elif name in ("qat", "qat-eager", "qat-compile"):
            kernel = {"qat": args.kernel, "qat-eager": "eager", "qat-compile": "compile"}[name]
            out[name] = Variant(name, qat_shared(), shared_opt, kernel=kernel)
        elif name == "qat-kd":
            out[name] = Variant(name, qat_shared(), shared_opt, kernel=args.kernel, teacher=get_teacher())
        elif name == "qat-kd-cached":
            try:
                from qat.distill.teacher_cache import teacher_topk
            except ImportError as e:
                notes.append(f"qat-kd-cached skipped: qat.distill.teacher_cache not importable ({e})")
                continue
            out[name] = Variant(name, qat_shared(), shared_opt, kernel=args.kernel, topk=("pending", teacher_topk))
        elif name == "qat-lora":
            from qat.train.lora import apply_lora

            m = copy.deepcopy(base)
            quantize_model(m, scheme)
            m = apply_lora(m, SimpleNamespace(peft=PeftSection()))  # r 16, alpha 16, separate: base frozen on grid
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-6)
            out[name] = Variant(name, m, opt, kernel=args.kernel)
        elif name == "torchao":
            try:
                import torchao
                from torchao.quantization import quantize_
                from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
            except Exception as e:  # not installed, or built for another torch
                notes.append(f"torchao skipped: not installed ({e.__class__.__name__}: {e})")
                continue
            m = share_params(base)
            targets = {n for n, _ in qat_linear_names(base)}
            quantize_(
                m,
                QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=args.group_size), step="prepare"),
                filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and fqn in targets,
            )
            replaced = sum(type(mod).__name__ == "FakeQuantizedLinear" for mod in m.modules())
            if replaced != len(targets):
                raise SystemExit(f"torchao: {replaced} FakeQuantizedLinear layers, expected {len(targets)}")
            notes.append(f"torchao {torchao.__version__}: FakeQuantizedLinear on the same {replaced} Linear layers as qat")
            out[name] = Variant(name, m, shared_opt)
        else:
            raise SystemExit(f"--variants: unknown variant {name!r} (one of {', '.join(ALL_VARIANTS)})")
    return out, base, notes


def qat_linear_names(model: nn.Module):
    """The Linear layers quantize_model's default targets pick (the transformer blocks')."""
    import re

    from qat.quant.apply import DEFAULT_TARGETS

    pats = [re.compile(p) for p in DEFAULT_TARGETS]
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(p.search(n) for p in pats)]


def resolved_kernel(kernel: str, device: torch.device) -> str:
    fused.set_kernel(kernel)
    used = "compile" if fused.use_fused(device) else "eager"
    fused.set_kernel("auto")
    return used if kernel != "auto" else f"auto:{used}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def persistent_bytes(v: Variant) -> int:
    """Bytes of what the variant keeps between steps: parameters, buffers, AdamW state of its
    trainable parameters, its teacher (each storage counted once)."""
    seen, total = set(), 0
    tensors = list(v.model.parameters()) + list(v.model.buffers())
    trainable = {id(p) for p in v.trainable}
    for p in v.model.parameters():
        if id(p) in trainable:
            tensors += [t for t in v.optimizer.state.get(p, {}).values() if torch.is_tensor(t)]
    if v.teacher is not None:
        tensors += list(v.teacher.parameters()) + list(v.teacher.buffers())
    if v.topk is not None and not isinstance(v.topk, tuple):
        tensors += [v.topk.ids, v.topk.logits]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def one_step(v: Variant, batch: dict, args, device: torch.device, chunk_tokens) -> None:
    fused.set_kernel(v.kernel)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast == "bf16")
    with autocast:
        logits = v.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    teacher = None
    if v.teacher is not None:
        with torch.no_grad(), autocast:
            teacher = v.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    elif v.topk is not None:
        teacher = v.topk
    kd_w, ce_w = (1.0, 0.0) if teacher is not None else (0.0, 1.0)
    loss, _, _ = distill_loss(logits, teacher, batch["labels"], "forward_kl", 1.0, kd_w, ce_w, chunk_tokens)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(v.trainable, 1.0)
    v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)


def timed_step(v: Variant, batch, args, device, chunk_tokens) -> None:
    sync(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    one_step(v, batch, args, device, chunk_tokens)
    sync(device)
    v.times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        v.mem_bytes.append(torch.cuda.max_memory_allocated(device) - before + persistent_bytes(v))


def model_flops_per_step(base: nn.Module, tokens: int, seq: int) -> float:
    cfg = base.config
    n = sum(m.weight.numel() for m in base.modules() if isinstance(m, nn.Linear))
    return tokens * (6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq)


def device_peak_tflops(device: torch.device, args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def versions() -> dict:
    import accelerate
    import peft
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__, "peft": peft.__version__}
    try:
        import torchao

        out["torchao"] = torchao.__version__
    except ImportError:
        pass
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=list(CONFIGS), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--steps", type=int, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, help="untimed rounds first (compilation, allocator)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(ALL_VARIANTS)}")
    ap.add_argument("--kernel", choices=fused.KERNELS, default="auto", help="fake-quant of the qat variants (as quant.kernel)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--weights", choices=list(DTYPES), default="float32", help="master weights (model.dtype)")
    ap.add_argument("--autocast", choices=["bf16", "none"], help="default: bf16 on CUDA, none on CPU")
    ap.add_argument("--teacher-dtype", choices=list(DTYPES), default="bfloat16")
    ap.add_argument("--chunk-tokens", default="recipe", help="KD/CE loss chunk (recipe default), or 'none' for the naive loss")
    ap.add_argument("--top-k", type=int, default=None, help="teacher top-k of qat-kd-cached (default: the recipe's)")
    ap.add_argument("--peak-tflops", type=float, help="device peak for MFU when not an H100/H200/A100")
    ap.add_argument("--compile-model", action="store_true", help="torch.compile every variant's model (as train.compile)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--results-md", help="append a dated section to this markdown file (e.g. benchmarks/RESULTS.md)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    b, s, steps, warmup = CONFIGS[args.config]
    args.batch, args.seq = args.batch or b, args.seq or s
    args.steps, args.warmup = args.steps or steps, args.warmup if args.warmup is not None else warmup
    args.autocast = args.autocast or ("bf16" if device.type == "cuda" else "none")
    dfields = DistillSection.model_fields
    chunk = dfields["chunk_tokens"].default if args.chunk_tokens == "recipe" and "chunk_tokens" in dfields else (
        None if args.chunk_tokens in ("none", "recipe") else int(args.chunk_tokens))
    top_k = args.top_k or (dfields["top_k"].default if "top_k" in dfields else 64)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]

    variants, base, notes = build_variants(names, args, device)
    if args.compile_model:  # the whole student, as qat train does with train.compile: true
        for v in variants.values():
            v.model = torch.compile(v.model)
        notes.append("every model torch.compile'd (--compile-model); warm-up rounds include compilation")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for v in variants.values():  # the cached teacher: top-k of the teacher's logits, computed once
        if isinstance(v.topk, tuple):
            from qat.distill import TopK

            teacher = copy.deepcopy(base).to(DTYPES[args.teacher_dtype]).eval()
            blocks = SimpleNamespace(input_ids=ids.cpu(), attention_mask=torch.ones_like(ids).cpu())
            acc = SimpleNamespace(autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast == "bf16"))
            top = v.topk[1](teacher, blocks, 0, args.batch, top_k, args.batch, device, accelerator=acc)
            v.topk = TopK(top["ids"].to(device).long(), top["logits"].to(device))
            del teacher

    order = list(variants)
    for r in range(args.warmup + args.steps):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            v = variants[name]
            if r < args.warmup:
                one_step(v, batch, args, device, chunk)
                v.mem_bytes.clear()
            else:
                timed_step(v, batch, args, device, chunk)
    fused.set_kernel("auto")

    tokens = args.batch * args.seq
    flops = model_flops_per_step(base, tokens, args.seq)
    peak = device_peak_tflops(device, args)
    ref = variants.get("plain")
    ref_t = statistics.median(ref.times) if ref else None
    ref_m = max(ref.mem_bytes) if ref and ref.mem_bytes else None
    rows = []
    for name, v in variants.items():
        t = statistics.median(v.times)
        mem = max(v.mem_bytes) if v.mem_bytes else None
        rows.append({
            "variant": name, "kernel": resolved_kernel(v.kernel, device) if name.startswith("qat") else None, "median_s": t,
            "times_s": v.times, "tokens_per_s": tokens / t, "ratio": t / ref_t if ref_t else None,
            "peak_mem_gb": mem / 2**30 if mem else None, "mem_ratio": mem / ref_m if mem and ref_m else None,
            "gflops_per_s": flops / t / 1e9, "mfu": flops / t / (peak * 1e12) if peak else None,
        })
    meta = {
        "date": datetime.date.today().isoformat(), "config": args.config, "device": device_name(device),
        "params": sum(p.numel() for p in base.parameters()), "batch": args.batch, "seq": args.seq,
        "steps": args.steps, "warmup": args.warmup, "weights": args.weights, "autocast": args.autocast,
        "teacher_dtype": args.teacher_dtype, "group_size": args.group_size, "chunk_tokens": chunk, "top_k": top_k,
        "kernel": args.kernel, "model_flops_per_step": flops, "peak_tflops": peak, "versions": versions(), "notes": notes,
        "command": "python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    table = format_table(rows, meta)
    print(table)
    result = {"meta": meta, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.results_md:
        with open(args.results_md, "a") as f:
            f.write("\n" + markdown_section(table, meta))
    return result


def _fmt(x, spec: str, na: str = "n/a") -> str:
    return na if x is None else format(x, spec)


def format_table(rows: list[dict], meta: dict) -> str:
    head = (f"{meta['config']} ({meta['params'] / 1e6:.1f} M params), batch {meta['batch']} x {meta['seq']}, "
            f"weights {meta['weights']}, autocast {meta['autocast']}, W4 g{meta['group_size']}, "
            f"median of {meta['steps']} after {meta['warmup']} warm-up, {meta['device']}")
    lines = [head, f"  {'variant':<14} {'kernel':<12} {'step s':>9} {'tokens/s':>10} {'x plain':>8} {'peak GB':>8} {'mem x':>6} {'GFLOP/s':>9} {'MFU':>6}"]
    for r in rows:
        lines.append(
            f"  {r['variant']:<14} {r['kernel'] or '-':<12} {r['median_s']:>9.4f} {r['tokens_per_s']:>10.0f} {_fmt(r['ratio'], '.3f'):>8} "
            f"{_fmt(r['peak_mem_gb'], '.2f'):>8} {_fmt(r['mem_ratio'], '.2f'):>6} {r['gflops_per_s']:>9.1f} {_fmt(r['mfu'], '.3f'):>6}"
        )
    lines += [f"  note: {n}" for n in meta["notes"]]
    return "\n".join(lines)


def markdown_section(table: str, meta: dict) -> str:
    v = ", ".join(f"{k} {x}" for k, x in meta["versions"].items())
    return (
        f"## Step time, {meta['config']}: plain vs QAT variants (benchmarks/step_time.py, {meta['date']})\n\n"
        f"{meta['device']}; {v}. KD loss chunk: {meta['chunk_tokens']}, teacher {meta['teacher_dtype']}, "
        f"top-k {meta['top_k']} (qat-kd-cached). Memory: CUDA peak above the step's start + the variant's "
        f"persistent tensors; n/a on CPU. MFU: the plain step's model FLOPs for every variant.\n\n"
        f"```\n{meta['command']}\n{table}\n```\n"
    )


if __name__ == "__main__":
    main()
