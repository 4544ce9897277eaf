"""Forward + backward cost of a fake-quant Linear (QATLinear, dynamic W4 g128 sym) vs nn.Linear.

For each weight shape ``out x in`` and a batch of M tokens, one step is
``y = layer(x); y.backward(gy)`` (gradients for the input and the weight, as inside a network).
The two layers are timed interleaved (their order alternates every repetition, so drift in clock
speed or background load hits both alike), after warm-up, and the medians are reported.

    python benchmarks/fake_quant.py                        # CPU, shapes sized for a few cores
    python benchmarks/fake_quant.py --device cuda --dtype bfloat16 --shapes 4096x4096,11008x4096,4096x11008
    python benchmarks/fake_quant.py --json runs/fake_quant.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch
from torch import nn

from qat.quant import QATLinear, QuantScheme

# LLaMA-7B's projection shapes (out x in): q/k/v/o, gate/up, down
GPU_SHAPES = "4096x4096,11008x4096,4096x11008"
# the same aspect ratios at half width: a few seconds per shape on 2 CPU cores
CPU_SHAPES = "2048x2048,5504x2048,2048x5504"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            out_f, in_f = (int(v) for v in item.lower().strip().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: expected OUTxIN[,OUTxIN...], got {item!r}") from None
        shapes.append((out_f, in_f))
    return shapes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_ms(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> float:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    _sync(x.device)
    t0 = time.perf_counter()
    y = layer(x)
    y.backward(gy)
    _sync(x.device)
    return (time.perf_counter() - t0) * 1e3


def bench_shape(out_f, in_f, tokens, scheme, device, dtype, warmup, reps) -> dict:
    torch.manual_seed(0)
    plain = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    qat = QATLinear.from_linear(copy.deepcopy(plain), scheme, f"{out_f}x{in_f}")
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(tokens, out_f, device=device, dtype=dtype)

    # sanity: both produce gradients of the right shape
    _step_ms(qat, x, gy)
    assert qat.weight.grad is not None and qat.weight.grad.shape == (out_f, in_f)

    layers = {"plain": plain, "qat": qat}
    for _ in range(warmup):
        for layer in layers.values():
            _step_ms(layer, x, gy)
    times: dict[str, list[float]] = {"plain": [], "qat": []}
    for rep in range(reps):
        order = ("plain", "qat") if rep % 2 == 0 else ("qat", "plain")
        for name in order:
            times[name].append(_step_ms(layers[name], x, gy))
    plain_ms, qat_ms = statistics.median(times["plain"]), statistics.median(times["qat"])
    return {
        "shape": f"{out_f}x{in_f}",
        "out_features": out_f,
        "in_features": in_f,
        "tokens": tokens,
        "plain_ms": plain_ms,
        "fake_quant_ms": qat_ms,
        "ratio": qat_ms / plain_ms,
        "overhead_ms": qat_ms - plain_ms,
        "plain_ms_all": times["plain"],
        "fake_quant_ms_all": times["qat"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--shapes", default=None, help=f"OUTxIN list (default: {CPU_SHAPES} on CPU, {GPU_SHAPES} on GPU)")
    p.add_argument("--tokens", "-M", type=int, default=512, help="tokens per step (rows of x), default 512")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on GPU")  # fmt: skip
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="0 = per-channel")
    p.add_argument("--asym", action="store_true", help="asymmetric (default: symmetric)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes = parse_shapes(args.shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES))
    scheme = QuantScheme(bits=args.bits, group_size=args.group_size or None, symmetric=not args.asym)
    gran = "per-channel" if scheme.group_size is None else f"g{scheme.group_size}"
    label = f"W{scheme.bits} {gran} {'sym' if scheme.symmetric else 'asym'} dynamic"

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# QATLinear ({label}) vs nn.Linear, forward+backward, M={args.tokens} tokens, {dtype}, "
          f"{device} ({dev_name}), threads={torch.get_num_threads()}, torch {torch.__version__}, "
          f"median of {args.reps} interleaved reps after {args.warmup} warm-up")  # fmt: skip
    header = f"{'shape (out x in)':>18} | {'plain ms':>9} | {'fake-quant ms':>13} | {'ratio':>6} | {'overhead ms':>11}"
    print(header)
    print("-" * len(header))
    results = []
    for out_f, in_f in shapes:
        r = bench_shape(out_f, in_f, args.tokens, scheme, device, dtype, args.warmup, args.reps)
        results.append(r)
        print(f"{r['shape']:>18} | {r['plain_ms']:9.2f} | {r['fake_quant_ms']:13.2f} | "
              f"{r['ratio']:5.2f}x | {r['overhead_ms']:11.2f}", flush=True)  # fmt: skip

    if args.json:
        meta = {
            "scheme": scheme.to_dict(),
            "device": str(device),
            "device_name": dev_name,
            "dtype": str(dtype),
            "tokens": args.tokens,
            "warmup": args.warmup,
            "reps": args.reps,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"# wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
