"""GPTQ wall time, total and per layer, through qat's own PTQ path (``qat.ptq.run.quantize_ptq``).

The model is quantized block by block exactly as ``qat ptq --method gptq`` does (calibration
forwards, streamed Hessians, true-sequential groups, the GPTQ solver per layer). Reported: the
total wall time, the solver time per layer (``qat.ptq.gptq.gptq_quantize``, timed around each
call with the device synchronised) summarised by projection, and the rest (calibration forwards,
Hessian accumulation, installing the quantized layers) as total minus solver.

Calibration data: seeded random token ids (GPTQ's cost does not depend on what the tokens are;
its result does, which is what ``qat compare`` measures).

    python benchmarks/ptq_speed.py --config small                        # CPU: ../shared/models/llama-small
    python benchmarks/ptq_speed.py --config 1b --device cuda --calib-seqs 128 --seq 2048
    python benchmarks/ptq_speed.py --config smoke                        # seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import qat.ptq.gptq as gptq_mod  # noqa: E402
from qat.ptq.run import quantize_ptq  # noqa: E402
from qat.quant import QuantScheme  # noqa: E402
from qat.quant.apply import DEFAULT_TARGETS  # noqa: E402
from qat.recipe import PTQSection  # noqa: E402
from step_time import device_name, load_base, versions  # noqa: E402

CONFIGS = {"smoke": (8, 64), "tiny": (32, 256), "small": (64, 512), "1b": (128, 2048)}  # calib seqs, seq len


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=list(CONFIGS), default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calib-seqs", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--json")
    ap.add_argument("--results-md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    n_seqs, seq = CONFIGS[args.config]
    n_seqs, seq = args.calib_seqs or n_seqs, args.seq or seq

    model = load_base(args.config, torch.float32, torch.device("cpu")).eval()
    pats = [re.compile(p) for p in DEFAULT_TARGETS]
    scheme = QuantScheme(bits=args.bits, group_size=args.group_size)
    plan = {n: scheme for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and any(p.search(n) for p in pats)}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (n_seqs, seq), generator=g)
    calib = _Blocks(ids)
    opts = PTQSection()
    if device.type == "cuda":
        model.to(device)  # fits: the 1b config is ~4 GB in float32

    solver: dict[str, float] = {}
    real = gptq_mod.gptq_quantize
    shapes: dict[str, tuple[int, int]] = {}

    def timed(weight, hessian, *a, **kw):  # the real solver, timed per call
        _sync(device)
        t0 = time.perf_counter()
        out = real(weight, hessian, *a, **kw)
        _sync(device)
        solver[f"#{len(solver)}"] = time.perf_counter() - t0
        shapes[f"#{len(shapes)}"] = tuple(weight.shape)
        return out

    gptq_mod.gptq_quantize = timed
    try:
        _sync(device)
        t0 = time.perf_counter()
        _, info, _ = quantize_ptq(model, plan, "gptq", calib, opts, device, device)
        _sync(device)
        total = time.perf_counter() - t0
    finally:
        gptq_mod.gptq_quantize = real
    names = list(info)  # gptq_block returns per-layer info in the order it quantized them
    per_layer = {n: solver[f"#{i}"] for i, n in enumerate(names)}
    by_proj: dict[str, list[float]] = defaultdict(list)
    for n, t in per_layer.items():
        by_proj[n.rsplit(".", 1)[-1]].append(t)
    solver_total = sum(per_layer.values())
    n_blocks = len({re.sub(r"\.(self_attn|mlp)\..*", "", n) for n in names})
    result = {
        "date": datetime.date.today().isoformat(), "config": args.config, "device": device_name(device),
        "versions": versions(), "calib_seqs": n_seqs, "seq": seq, "calib_tokens": n_seqs * seq,
        "scheme": f"W{args.bits} g{args.group_size} sym", "layers": len(names), "blocks": n_blocks,
        "total_s": total, "solver_s": solver_total, "rest_s": total - solver_total,
        "per_layer_s": per_layer, "shapes": {n: shapes[f"#{i}"] for i, n in enumerate(names)},
        "command": "python benchmarks/ptq_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    lines = [
        f"GPTQ {result['scheme']}, {args.config}: {len(names)} layers in {n_blocks} blocks, "
        f"{n_seqs} x {seq} calibration tokens, {result['device']}",
        f"  total {total:.2f} s = solver {solver_total:.2f} s + calibration forwards/Hessians/install {total - solver_total:.2f} s; "
        f"{total / n_blocks:.2f} s per block, {total / len(names):.3f} s per layer",
        f"  {'projection':<10} {'shape (out x in)':>17} {'layers':>6} {'solver s (median)':>18} {'solver s (sum)':>15}",
    ]
    for proj, ts in by_proj.items():
        shape = next(result["shapes"][n] for n in names if n.endswith("." + proj))
        lines.append(f"  {proj:<10} {f'{shape[0]}x{shape[1]}':>17} {len(ts):>6} {statistics.median(ts):>18.4f} {sum(ts):>15.3f}")
    table = "\n".join(lines)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.results_md:
        v = ", ".join(f"{k} {x}" for k, x in result["versions"].items())
        with open(args.results_md, "a") as f:
            f.write(f"\n## PTQ speed: GPTQ on {args.config} (benchmarks/ptq_speed.py, {result['date']})\n\n"
                    f"{result['device']}; {v}. Random-token calibration data; default GPTQ options "
                    f"(damp 0.01, 128-column blocks, true-sequential).\n\n```\n{result['command']}\n{table}\n```\n")
    return result


class _Blocks:
    """Calibration rows as ``quantize_layerwise`` reads them (``len``, ``.input_ids``, ``.attention_mask``)."""

    def __init__(self, ids: torch.Tensor):
        self.input_ids, self.attention_mask = ids, torch.ones_like(ids)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
