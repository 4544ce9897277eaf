"""Why QAT started from a GPTQ run (``quant.init_from``) ends worse than QAT started from the FP
weights: how far the latent weights sit from a rounding boundary at the start, and how many
integer codes QAT changes from each start.

    python benchmarks/init_from_study.py SOURCE_MODEL_DIR RECIPE_BITS GROUP \\
        --start fp=RUN_FROM_FP --start gptq=RUN_FROM_GPTQ --gptq GPTQ_RUN

For every quantized layer of the two QAT runs: the codes at the start (FP start: min-max codes of
the source weights; GPTQ start: the GPTQ run's codes) and at the end (each run's final/ weights on
its final qparams); the fraction of codes that changed; at the start, the distance of each
latent weight to the nearest rounding boundary in units of its scale (``0.5 - |v - round(v)|``:
0.5 = at a grid point, the farthest from a flip; ~0.25 on average for weights spread across bins);
and the most an Adam update can move a weight over the whole run (about the sum of the learning
rates) against the median scale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qat.io.final import load_quant_layers, read_qparams  # noqa: E402
from qat.quant.grid import group_view, minmax_qparams, quantize  # noqa: E402
from qat.recipe import load_recipe  # noqa: E402
from qat.train.optim import lr_at  # noqa: E402


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    return out


def codes_of(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, sym: bool, g: int | None) -> torch.Tensor:
    return quantize(w, s.float(), z.float(), bits, sym, g)


def boundary_distance(w, s, z, g) -> torch.Tensor:
    v = group_view(w, g) / s.float().unsqueeze(-1) + z.float().unsqueeze(-1)
    return 0.5 - (v - torch.round(v)).abs()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("--start", action="append", required=True, help="NAME=QAT_RUN (NAME fp or gptq)")
    ap.add_argument("--gptq", required=True, help="the GPTQ run the gptq start came from")
    args = ap.parse_args()
    src = weights(Path(args.source))
    gptq_final = Path(args.gptq) / "final"
    layers = load_quant_layers(gptq_final)
    g_w, g_q = weights(gptq_final), read_qparams(gptq_final)
    result = {}
    for item in args.start:
        name, run = item.split("=", 1)
        final = Path(run) / "final"
        f_w, f_q = weights(final), read_qparams(final)
        changed = total = 0
        dist_sum = 0.0
        scales = []
        for layer, info in layers.items():
            bits, g, sym = info["bits"], info["group_size"], info["symmetric"]
            key = f"{layer}.weight"
            if name == "gptq":
                w0, s0, z0 = g_w[key], g_q[f"{layer}.weight_scale"], g_q[f"{layer}.weight_zero_point"]
            else:
                w0 = src[key]
                s0, z0 = minmax_qparams(w0, bits, g, sym)
            c0 = codes_of(w0, s0, z0, bits, sym, g)
            s1, z1 = f_q[f"{layer}.weight_scale"], f_q[f"{layer}.weight_zero_point"]
            c1 = codes_of(f_w[key], s1, z1, bits, sym, g)
            changed += (c0 != c1).sum().item()
            total += c0.numel()
            dist_sum += boundary_distance(w0, s0, z0, g).sum().item()
            scales.append(s0.float().flatten())
        recipe = load_recipe(str(Path(run) / "recipe.yaml"))
        steps = recipe.train.max_steps
        lr_sum = sum(lr_at(i, recipe, steps) for i in range(steps))
        median_s = torch.cat(scales).median().item()
        result[name] = {
            "codes_changed": changed / total,
            "start_distance_to_boundary_in_scales": dist_sum / total,
            "median_scale": median_s,
            "sum_of_lr": lr_sum,
            "max_adam_move_in_scales": lr_sum / median_s,
        }
    print(f"{'start':6s} {'codes changed':>14s} {'mean distance to a flip at start (x s)':>39s} {'median s':>10s} {'sum of lr':>10s} {'sum of lr / s':>14s}")
    for name, r in result.items():
        print(f"{name:6s} {r['codes_changed']:14.4f} {r['start_distance_to_boundary_in_scales']:39.3f} {r['median_scale']:10.4f} "
              f"{r['sum_of_lr']:10.4f} {r['max_adam_move_in_scales']:14.3f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
