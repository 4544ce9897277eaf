"""What every export writer reads: a run's final/ as integer codes + qparams, recovered bit for bit."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..io.final import ADAPTER_DIR, QPARAMS_FILE, QUANT_FILE, FinalError, find_final, has_adapter, load_quant_layers, read_qparams
from ..io.models import DTYPES
from ..quant.apply import planned_weight
from ..quant.grid import dequantize, quantize
from ..quant.linear import QuantizedWeight
from ..quant.scheme import QuantScheme

_MODEL_FILES = ("config.json", "generation_config.json", QUANT_FILE, QPARAMS_FILE, "model.safetensors.index.json")


class ExportError(ValueError):
    """A run or scheme that cannot be exported in the requested format (the CLI: exit code 2)."""


@dataclass
class ExportSource:
    """What every writer consumes. ``model`` is float32 (exactly final/'s weights, upcast);
    ``qweights`` holds, per quantized layer, unsigned codes and qparams in ``dtype``."""

    run_dir: Path | None
    final_dir: Path
    model: nn.Module
    dtype: torch.dtype
    layers: dict[str, dict]  # qat_quant.json "layers"
    qweights: dict[str, QuantizedWeight]
    adapter_dir: Path | None = None
    notes: dict = field(default_factory=dict)
    any_bits: bool = False  # pack int2/int3 too (compressed-tensors; not servable by vLLM)
    # fused expert tensor -> {per-expert module of the checkpoint layout: its rows} (qat/io/layout.py)
    expert_rows: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def stored_names(self, names) -> list[str]:
        """The module names the checkpoint stores ``names`` under (per-expert ones for a fused tensor)."""
        return [m for n in names for m in (self.expert_rows[n] if n in self.expert_rows else [n])]


def resolve_run(run_dir: str | os.PathLike) -> tuple[Path | None, Path]:
    """``RUN_DIR`` (holding ``final/``) or ``RUN_DIR/final`` itself -> (run_dir, final_dir)."""
    p = Path(run_dir)
    if not p.exists():
        raise ExportError(f"{p}: no such run directory")
    final = find_final(p)
    if final is not None:
        return (p if final != p else p.parent if p.name == "final" else None), final
    raise ExportError(f"{p}: not a qat run directory (no final/config.json; run `qat train` first)")


def _scheme(info: dict) -> QuantScheme:
    return QuantScheme(
        bits=info["bits"], group_size=info["group_size"], symmetric=info["symmetric"], act_bits=info.get("act_bits"), grid=info.get("grid", "int")
    )


def _scheme_key(info: dict) -> tuple:
    return (info["bits"], info["group_size"], info["symmetric"], info.get("grid", "int"))


def describe(key: tuple) -> str:
    bits, g, sym, grid = key
    return f"int{bits} {'per-channel' if g is None else f'group {g}'} {'seq' if grid == 'seq' else 'sym' if sym else 'asym'}"


def read_layers(final_dir: Path) -> dict[str, dict]:
    if not (final_dir / QUANT_FILE).is_file():
        raise ExportError(f"{final_dir}: no {QUANT_FILE} (was final/ written by qat?)")
    try:
        layers = load_quant_layers(final_dir)
    except FinalError as e:
        raise ExportError(str(e)) from None
    if not layers:
        raise ExportError(f"{final_dir}: no quantized layers (a quant: null run); there is nothing to pack")
    return layers


@torch.no_grad()
def recover_codes(w: Tensor, scale: Tensor, zero: Tensor, scheme: QuantScheme, dtype: torch.dtype, name: str = "") -> Tensor:
    """The codes ``u`` with ``dequantize(u, scale, zero) == w`` in ``dtype``, bit for bit.

    ``round(w / s + z)`` in float64 finds them; where a bf16 product ``(u - z) * s`` rounded onto
    a neighbour's value, either code dequantizes to ``w`` and the one found is kept. Raises
    ``ExportError`` if some weight is on no code's value (final/ not on the grid of its qparams).
    """
    g = scheme.group_size
    codes = quantize(w.double(), scale.double(), zero.double(), scheme.bits, scheme.symmetric, g)
    target = w.to(dtype)
    ok = dequantize(codes, scale, zero, g, dtype) == target
    if not ok.all():
        for delta in (-1, 1):
            cand = (codes + delta).clamp(scheme.qmin, scheme.qmax)
            hit = ~ok & (dequantize(cand, scale, zero, g, dtype) == target)
            codes = torch.where(hit, cand, codes)
            ok = ok | hit
    if not ok.all():
        bad = int((~ok).sum())
        raise ExportError(
            f"layer {name}: {bad} weights of final/ are not on the grid of its {QPARAMS_FILE} "
            "(final/ edited after training?); cannot export it exactly"
        )
    return codes


def _final_dtype(final_dir: Path, qparams: dict[str, Tensor]) -> torch.dtype:
    if qparams:
        return next(iter(qparams.values())).dtype  # scales are stored in final/'s dtype
    cfg = json.loads((final_dir / "config.json").read_text())
    return DTYPES.get(cfg.get("dtype") or cfg.get("torch_dtype") or "float32", torch.float32)


@torch.no_grad()
def load_source(run_dir: str | os.PathLike) -> ExportSource:
    """Read ``final/`` (model in float32, codes recovered and checked for every quantized layer)."""
    from transformers import AutoModelForCausalLM

    run, final = resolve_run(run_dir)
    layers = read_layers(final)
    qparams = read_qparams(final)
    if qparams is None:
        raise ExportError(f"{final}: no {QPARAMS_FILE}; the integer codes cannot be recovered")
    dtype = _final_dtype(final, qparams)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    qweights = {}
    for name, info in layers.items():
        try:
            scale, zero = qparams[f"{name}.weight_scale"], qparams[f"{name}.weight_zero_point"]
            weight = planned_weight(model, name)
        except (KeyError, AttributeError):
            raise ExportError(f"{final}: layer {name} of {QUANT_FILE} is missing from the model or {QPARAMS_FILE}") from None
        scheme = _scheme(info)
        codes = recover_codes(weight, scale, zero, scheme, dtype, name)
        qweights[name] = QuantizedWeight(codes, scale, zero, scheme)
    adapter = final / ADAPTER_DIR if has_adapter(final) else None
    return ExportSource(run, final, model, dtype, layers, qweights, adapter)
