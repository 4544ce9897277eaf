"""``quant.init_from``: start QAT from a finished run's ``final/`` (a ``qat ptq`` result: GPTQ,
AWQ, QERA, RTN; or an earlier ``qat train``) instead of the original weights.

Every quantized Linear of the student takes the run's *effective* weight
(``diagnostic.effective_weights``: the on-grid weight, plus a QERA / LoRA correction ``B A`` when
``final/adapter`` holds one, and AWQ's folded per-channel factors mapped back, so the weight lives
in the original model's space; norms and embeddings stay the original ones). When that weight is
exactly on the run's grid (no adapter, no folded factors: RTN, GPTQ, QAT), the run's qparams
(``qat_qparams.safetensors``) become the starting qparams too, so the first forward is that run's
model: learnable scales take them as they are; dynamic ones get the per-group clip ratio that makes
min-max give that scale (exact for symmetric schemes; asymmetric zero-points are recomputed).
Otherwise the qparams are initialised from the loaded weights by ``quant.scale_init``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..io.final import QUANT_FILE, SCALES_FILE, FinalError, effective_weights, has_adapter, load_quant_layers, read_qparams
from ..quant.apply import qat_linears, reinit_qparams
from ..quant.grid import minmax_qparams
from ..recipe import RecipeError


def final_dir_of(run: str | Path) -> Path:
    run = Path(run).expanduser()
    return run if (run / QUANT_FILE).is_file() else run / "final"


def check_layers(schemes: dict, run: str | Path) -> None:
    """``run`` quantized the same layers with the same bits, group size and symmetry as ``schemes``
    (``{layer: QuantScheme}``), else a ``RecipeError`` on ``quant.init_from`` (read from
    ``qat_quant.json`` alone: the recipe check runs it before any weights load)."""
    try:
        saved = load_quant_layers(final_dir_of(run))
    except FinalError as e:
        raise RecipeError(f"quant.init_from: {e}") from None
    if set(saved) != set(schemes):
        only = sorted(set(schemes) ^ set(saved))[:3]
        raise RecipeError(f"quant.init_from: {run} quantized other layers than this recipe (e.g. {only})")
    for name, s in schemes.items():
        d = saved[name]
        if (s.bits, s.group_size, s.symmetric) != (d["bits"], d["group_size"], d["symmetric"]):
            raise RecipeError(
                f"quant.init_from: {run} has {name} at bits {d['bits']} group {d['group_size']} symmetric {d['symmetric']}, "
                f"the recipe at bits {s.bits} group {s.group_size} symmetric {s.symmetric}"
            )


@torch.no_grad()
def load_quantized_start(model: nn.Module, run: str | Path) -> str:
    """Load ``run``'s quantized layers into the wrapped ``model`` in place (see module doc);
    returns a one-line summary. Layer set and scheme (bits, group size, symmetry) must match."""
    final = final_dir_of(run)
    layers = qat_linears(model)
    check_layers({n: m.scheme for n, m in layers.items()}, run)
    weights = effective_weights(final, list(layers))
    on_grid = not has_adapter(final) and not (final / SCALES_FILE).exists()
    for name, layer in layers.items():
        layer.weight.copy_(weights[name].to(layer.weight.dtype))
    if not on_grid:
        reinit_qparams(model)
        return f"quant.init_from: {len(layers)} layers from {final} (weights with their low-rank/folded corrections; qparams re-initialised)"
    qp = read_qparams(final)
    for name, layer in layers.items():
        scale = qp[f"{name}.weight_scale"].float().to(layer.weight.device)
        zero = qp[f"{name}.weight_zero_point"].float().to(layer.weight.device)
        s = layer.scheme
        if layer.fixed:
            layer.set_qparams(scale.to(layer.weight_scale.dtype), zero.to(layer.weight_zero_point.dtype))
        elif s.learnable:
            layer.weight_scale.copy_(scale)
            layer.weight_zero_point.copy_(zero)
        else:  # dynamic: the clip ratio that turns this weight's min-max scale into the run's scale
            base, _ = minmax_qparams(layer.weight.detach().float(), s.bits, s.group_size, s.symmetric)
            layer.clip_ratio.copy_(scale / base)
    return f"quant.init_from: {len(layers)} layers from {final} (on-grid weights and their qparams)"
