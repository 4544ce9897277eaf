"""The run's deliverable: ``final/``, a Hugging Face model directory with on-grid weights.

Every quantized Linear is replaced by a plain ``nn.Linear`` holding its dequantized weight, so
``AutoModelForCausalLM.from_pretrained(final)`` loads it with plain transformers. Beside it:

- ``qat_quant.json``: ``{"layers": {name: {"bits", "group_size", "symmetric", "frozen", "act_bits"}}}``
- ``qat_qparams.safetensors``: ``<name>.weight_scale`` and ``<name>.weight_zero_point`` of every
  quantized layer, so export can recover the integer codes exactly;
- the tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .quant.apply import dequantize_model

QUANT_FILE = "qat_quant.json"
QPARAMS_FILE = "qat_qparams.safetensors"


def final_dtype(recipe, config) -> str:
    """The dtype ``final/`` (and so the export) is written in: ``model.save_dtype`` when set, else
    the source checkpoint's own dtype (bf16 for Llama checkpoints), as llm-compressor writes and
    vLLM serves (it casts an fp32 config to bf16), else ``model.dtype`` (a from-scratch model).
    Read from the source config *before* weights load (loading sets the config to the load dtype)."""
    if recipe.model.save_dtype is not None:
        return recipe.model.save_dtype
    source = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) if recipe.model.path else None
    name = str(source).removeprefix("torch.") if source is not None else None
    return name if name in ("float32", "bfloat16", "float16") else recipe.model.dtype


@torch.no_grad()
def save_final(model: nn.Module, tokenizer, out_dir: Path, dtype: torch.dtype) -> dict[str, dict]:
    """Dequantize ``model`` in place (its QATLinear layers become plain Linear layers), cast it
    to ``dtype`` and save it to ``out_dir``. Returns the per-layer description."""
    layers = dequantize_model(model, dtype)
    model.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    qparams = {}
    for name, info in layers.items():
        qw = info.pop("_qweight")
        qparams[f"{name}.weight_scale"] = qw.scale.contiguous().cpu()
        qparams[f"{name}.weight_zero_point"] = qw.zero_point.contiguous().cpu()
    if layers:
        save_file(qparams, str(out_dir / QPARAMS_FILE))
    (out_dir / QUANT_FILE).write_text(json.dumps({"layers": layers}, indent=1))
    return layers


def load_quant_layers(final_dir: Path) -> dict[str, dict]:
    path = Path(final_dir) / QUANT_FILE
    return json.loads(path.read_text())["layers"] if path.exists() else {}
