"""``quant.init_from``: start QAT from a finished run's ``final/`` (a ``qat ptq`` result: GPTQ,
AWQ, QERA, RTN; or an earlier ``qat train``) instead of the original weights.

Every quantized Linear of the student takes the run's *effective* weight
(``diagnostic.effective_weights``: the on-grid weight, plus a QERA / LoRA correction ``B A`` when
``final/adapter`` holds one, and AWQ's folded per-channel factors mapped back, so the weight lives
in the original model's space; norms and embeddings stay the original ones). When that weight is
exactly on the run's grid (no adapter, no folded factors: RTN, GPTQ, QAT), the run's qparams
(``qat/qparams.safetensors``) become the starting qparams too, so the first forward is that run's
model: learnable scales take them as they are; dynamic ones get the per-group clip ratio that makes
min-max give that scale (exact for symmetric schemes; asymmetric zero-points are recomputed).
Otherwise the qparams are initialised from the loaded weights by ``quant.scale_init``.

On-grid weights sit at grid points, the farthest a weight can be from a rounding flip (half a
scale step); over a short run Adam moves a weight far less than that (``benchmarks/init_from_study.py``:
W2g64 on llama-tiny, the sum of the learning rates is 0.07 of a scale), so QAT from a GPTQ run's
on-grid weights changed no code at all. A GPTQ run therefore also writes ``qat/latent.safetensors``:
each column as GPTQ had it just before rounding (error feedback included). Rounded on the run's
qparams these give exactly its codes, so step 0 is still the GPTQ model, but they lie anywhere
inside their rounding bins, as trained weights do; when present they are the latent start
(dynamic and learnable qparams; a fixed layer keeps the on-grid weight). A Block-AP run
(``ptq/block_ap.py``) writes the same file: its block-trained weights, EfficientQAT's start for
end-to-end QAT.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..io.final import LATENT_FILE, QUANT_FILE, SCALES_FILE, FinalError, side_file, effective_weights, has_adapter, load_quant_layers, read_qparams
from ..quant.apply import qat_linears, reinit_qparams
from ..quant.grid import minmax_qparams, quantize
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
        if (s.bits, s.group_size, s.symmetric, s.grid) != (d["bits"], d["group_size"], d["symmetric"], d.get("grid", "int")):
            raise RecipeError(
                f"quant.init_from: {run} has {name} at bits {d['bits']} group {d['group_size']} symmetric {d['symmetric']} "
                f"grid {d.get('grid', 'int')}, the recipe at bits {s.bits} group {s.group_size} symmetric {s.symmetric} grid {s.grid}"
            )


@torch.no_grad()
def load_quantized_start(model: nn.Module, run: str | Path) -> str:
    """Load ``run``'s quantized layers into the wrapped ``model`` in place (see module doc);
    returns a one-line summary. Layer set and scheme (bits, group size, symmetry) must match."""
    final = final_dir_of(run)
    layers = qat_linears(model)
    check_layers({n: m.scheme for n, m in layers.items()}, run)
    weights = effective_weights(final, list(layers))
    on_grid = not has_adapter(final) and not side_file(final, SCALES_FILE).exists()
    for name, layer in layers.items():
        layer.weight.copy_(weights[name].to(layer.weight.dtype))
    if not on_grid:
        reinit_qparams(model)
        return f"quant.init_from: {len(layers)} layers from {final} (weights with their low-rank/folded corrections; qparams re-initialised)"
    qp = read_qparams(final)
    latent = load_file(str(side_file(final, LATENT_FILE))) if side_file(final, LATENT_FILE).is_file() else {}
    kept = total = 0
    for name, layer in layers.items():
        scale = qp[f"{name}.weight_scale"].float().to(layer.weight.device)
        zero = qp[f"{name}.weight_zero_point"].float().to(layer.weight.device)
        s = layer.scheme
        on_grid_w = layer.weight.detach().float().clone()  # (.float() of an fp32 tensor is the tensor itself)
        pre = latent.get(f"{name}.weight") if not layer.fixed else None
        if pre is not None:
            kept += _take_latent(layer, pre.float().to(on_grid_w.device), on_grid_w, scale, zero)
            total += on_grid_w.numel()
        if layer.fixed:
            layer.set_qparams(scale.to(layer.weight_scale.dtype), zero.to(layer.weight_zero_point.dtype))
        elif s.learnable:
            layer.weight_scale.copy_(scale)
            layer.weight_zero_point.copy_(zero)
        else:  # dynamic: the clip ratio that turns this weight's min-max scale into the run's scale
            _set_clip_ratio(layer, scale)
            if pre is not None:
                kept -= _match_dynamic_codes(layer, on_grid_w, scale, zero)
    if total:
        return (f"quant.init_from: {len(layers)} layers from {final} (their codes and qparams; latent weights from {LATENT_FILE}, "
                f"the run's weights before rounding (GPTQ, Block-AP): {kept / total:.2%} of them, the rest on the grid)")
    return f"quant.init_from: {len(layers)} layers from {final} (on-grid weights and their qparams)"


def _codes(w, scale, zero, s):
    return quantize(w, scale, zero, s.bits, s.symmetric, s.group_size)


def _take_latent(layer, pre, on_grid_w, scale, zero) -> int:
    """The layer's weight := GPTQ's pre-rounding weight wherever it rounds to the stored code on the
    stored qparams (saved in final/'s dtype, a rounding that can move a weight right at a boundary),
    else the on-grid weight; so step 0 is exactly the stored model. Returns how many were taken."""
    same = _codes(pre, scale, zero, layer.scheme) == _codes(on_grid_w, scale, zero, layer.scheme)
    layer.weight.copy_(torch.where(same, pre, on_grid_w).to(layer.weight.dtype))
    return int(same.sum())


def _set_clip_ratio(layer, scale) -> None:
    s = layer.scheme
    base, _ = minmax_qparams(layer.weight.detach().float(), s.bits, s.group_size, s.symmetric, seq=s.seq)
    layer.clip_ratio.copy_(scale / base)


def _match_dynamic_codes(layer, on_grid_w, scale, zero) -> int:
    """Dynamic qparams are min-max x ratio, which can differ from ``scale`` by an ulp: a latent weight
    right at a boundary then rounds the other way. Those take their on-grid value (the ratio is
    recomputed, in case one was a group's extreme). Returns how many were replaced."""
    target = _codes(on_grid_w, scale, zero, layer.scheme)
    replaced = 0
    for _ in range(3):
        ds, dz = layer.qparams()
        off = _codes(layer.weight.detach().float(), ds.float(), dz.float(), layer.scheme) != target
        if not off.any():
            break
        layer.weight.copy_(torch.where(off, on_grid_w, layer.weight.detach().float()).to(layer.weight.dtype))
        replaced += int(off.sum())
        _set_clip_ratio(layer, scale)
    return replaced
