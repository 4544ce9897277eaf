"""Peak memory and time of the loss alone (forward + backward) given the models' logits.

    python benchmarks/kd_memory.py                          # vocab 128256, seq 2048, batch 1, bf16
    python benchmarks/kd_memory.py --batch 4 --device cuda  # on a GPU
    OMP_NUM_THREADS=1 python benchmarks/kd_memory.py --vocab 32000 --reps 1

Inputs: student logits ``[B, T, V]`` (requires grad) and teacher logits (or the teacher's top-k
ids + logits, for the cached path) in ``--dtype``, random labels without padding. Each variant
runs in a fresh subprocess. Memory is measured above the inputs, and includes the gradient of
the student logits that backward leaves behind (``[B, T, V]`` in the logits' dtype, the same for
every variant):

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` once the inputs exist;
- CPU: the process's peak resident set (VmHWM in /proc/self/status) after resetting it
  (``5`` > /proc/self/clear_refs) once the inputs exist, minus the resident set then. The inputs
  are generated in slices, so no large temporary precedes the reset. Large tensors are mmap'ed
  by glibc and returned to the system when freed, so the resident set follows the live tensors.

Time: the median of ``--reps`` forward + backward passes after the measured one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "ce": "cross-entropy, naive (F.cross_entropy on float32 logits, as qat.distill.ce_loss)",
    "ce-chunked": "cross-entropy, chunked (distill_loss without teacher)",
    "kd-naive": "forward KL, naive (qat.distill.kd_loss)",
    "kd-chunked": "forward KL + CE for logging, chunked (distill_loss, the default of qat train)",
    "jsd-chunked": "JSD + CE for logging, chunked",
    "kd-topk-chunked": "forward KL on the teacher's top-64 (teacher cache) + CE, chunked",
}


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_inputs(variant: str, B: int, T: int, V: int, dtype, device, k: int, seed: int = 0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)

    def logits():
        x = torch.empty(B, T, V, dtype=dtype, device=device)
        for b in range(B):
            for t0 in range(0, T, 128):
                x[b, t0 : t0 + 128] = 3 * torch.randn(min(128, T - t0), V, generator=g, device=device)
        return x

    student = logits().requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g, device=device)
    teacher = None
    if variant.startswith(("kd", "jsd")):
        teacher = logits()
        if "topk" in variant:
            from qat.distill import TopK

            ids = torch.empty(B, T, k, dtype=torch.int32, device=device)
            vals = torch.empty(B, T, k, dtype=dtype, device=device)
            for b in range(B):
                top = teacher[b].topk(k, dim=-1)
                ids[b], vals[b] = top.indices.to(torch.int32), top.values
            teacher = TopK(ids, vals)
    return student, teacher, labels


def loss_fn(variant: str, chunk: int):
    from qat.distill import ce_loss, distill_loss, kd_loss

    if variant == "ce":
        return lambda s, t, y: ce_loss(s, y)
    if variant == "ce-chunked":
        return lambda s, t, y: distill_loss(s, None, y, ce_weight=1.0, chunk_tokens=chunk)[0]
    if variant == "kd-naive":
        return lambda s, t, y: kd_loss(s, t, y)
    loss = "jsd" if variant.startswith("jsd") else "forward_kl"
    return lambda s, t, y: distill_loss(s, t, y, loss=loss, chunk_tokens=chunk)[0]


def run_one(a) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    s, t, y = make_inputs(a.one, a.batch, a.seq, a.vocab, dtype, device, a.top_k)
    f = loss_fn(a.one, a.chunk)

    def step():
        s.grad = None
        f(s, t, y).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current resident set
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_kib("VmHWM") * 1024) - base
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"variant": a.one, "peak_gib": peak / 2**30, "time_s": statistics.median(times) if times else first, "first_s": first}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--chunk", type=int, default=256, help="distill.chunk_tokens of the chunked variants")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--reps", type=int, default=2, help="timed passes after the measured one")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.one:
        print(json.dumps(run_one(a)))
        return

    rows = []
    for v in a.variants.split(","):
        cmd = [sys.executable, __file__, "--one", v] + [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in ("vocab", "seq", "batch", "dtype", "chunk", "top_k", "reps", "device")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{v}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {threads} thread(s)"
    logits_gib = a.batch * a.seq * a.vocab * torch.finfo(getattr(torch, a.dtype)).bits / 8 / 2**30
    print(f"\nloss forward+backward, {a.dtype} logits [{a.batch}, {a.seq}, {a.vocab}] ({logits_gib:.2f} GiB each), "
          f"chunk {a.chunk} tokens, {where}, torch {torch.__version__}")
    print("peak = memory above the inputs, the logits' gradient included\n")
    ce = next((r["peak_gib"] for r in rows if r["variant"] == "ce"), None)
    print("| variant | peak (GiB) | peak / CE naive | time (s) | what |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        ratio = f"{r['peak_gib'] / ce:.2f}" if ce else "-"
        print(f"| {r['variant']} | {r['peak_gib']:.2f} | {ratio} | {r['time_s']:.3f} | {VARIANTS[r['variant']]} |")


if __name__ == "__main__":
    main()
