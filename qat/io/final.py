"""The run's deliverable: ``final/``, a Hugging Face model directory with on-grid weights.

Every quantized Linear is replaced by a plain ``nn.Linear`` holding its dequantized weight, so
``AutoModelForCausalLM.from_pretrained(final)`` loads it with plain transformers. Beside it:

- ``qat_quant.json``: ``{"layers": {name: {"bits", "group_size", "symmetric", "grid", "frozen", "act_bits"}}}``
  (``grid`` is absent in runs written before it existed: read as ``"int"``)
- ``qat/qparams.safetensors``: ``<name>.weight_scale`` and ``<name>.weight_zero_point`` of every
  quantized layer, so export can recover the integer codes exactly;
- the tokenizer files;
- what a PTQ method adds: ``qat/scales.safetensors`` (AWQ's folded factors), ``qat/latent.safetensors``
  (GPTQ's and Block-AP's weights before rounding), ``adapter/`` (a PEFT adapter: QERA, LoRA-QAT),
  notes in ``qat_quant.json`` (NF4).

qat's own tensor files live in the ``qat/`` subdirectory (``SIDE_DIR``): a loader that reads every
``*.safetensors`` of a model folder without an index (vLLM's default loader does) sees only the
model's weights. Runs written before read from their old places beside the weights
(``qat_qparams.safetensors`` ...; ``side_file``).

This module is the format's one owner: every writer and reader of ``final/`` goes through it.
``writing_final`` makes the write atomic: ``final/`` is built in a temporary directory beside it
and renamed into place only when complete, so a failed or killed write never leaves a partial
``final/`` (nor removes the previous one before the new one is whole).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..quant.apply import dequantize_model
from .rundir import fsync_dir, fsync_tree, write_json_atomic

QUANT_FILE = "qat_quant.json"
SIDE_DIR = "qat"  # qat's own tensor files: no loader of the model folder takes them for weight shards
QPARAMS_FILE = f"{SIDE_DIR}/qparams.safetensors"
ADAPTER_DIR = "adapter"  # a PEFT adapter beside the on-grid base (LoRA-QAT, QERA)
SCALES_FILE = f"{SIDE_DIR}/scales.safetensors"  # per-channel factors PTQ folded into layers (AWQ)
LATENT_FILE = f"{SIDE_DIR}/latent.safetensors"  # GPTQ's pre-rounding weights: where quant.init_from starts QAT
SHARD_SIZE = "5GB"  # final/'s weight files: numbered shards of at most this, with an index, as hub checkpoints ship
LEGACY = {QPARAMS_FILE: "qat_qparams.safetensors", SCALES_FILE: "qat_scales.safetensors", LATENT_FILE: "qat_latent.safetensors"}


def side_file(final_dir: str | Path, name: str) -> Path:
    """Where ``final_dir`` keeps the side file ``name`` (``QPARAMS_FILE`` ...): its place, or the
    place runs written before ``SIDE_DIR`` kept it in."""
    new = Path(final_dir) / name
    old = Path(final_dir) / LEGACY.get(name, name)
    return old if not new.exists() and old.exists() else new


def save_side_file(tensors: dict[str, Tensor], final_dir: str | Path, name: str) -> None:
    path = Path(final_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


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
def save_final(model: nn.Module, tokenizer, out_dir: Path, dtype: torch.dtype, param_dtype: torch.dtype | None = None) -> dict[str, dict]:
    """Dequantize ``model`` in place (its QATLinear layers become plain Linear layers), cast it
    to ``dtype`` and save it to ``out_dir``. Returns the per-layer description."""
    layers = dequantize_model(model, dtype, param_dtype)
    model.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=SHARD_SIZE)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    qparams = {}
    for name, info in layers.items():
        scale, zero = info.pop("_qparams")
        qparams[f"{name}.weight_scale"] = scale.contiguous().cpu()
        qparams[f"{name}.weight_zero_point"] = zero.contiguous().cpu()
    write_quant_files(out_dir, layers, qparams)
    return layers


class FinalError(ValueError):
    """A ``final/`` that is missing a part or damaged; the message names the file."""


def load_quant_layers(final_dir: Path) -> dict[str, dict]:
    """The ``layers`` of ``qat_quant.json`` (``{}`` when there is none); ``FinalError`` when the
    file is there but damaged."""
    path = Path(final_dir) / QUANT_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FinalError(f"{path}: unreadable ({e.__class__.__name__}: {e}); final/ is damaged, write it again with qat train / qat ptq") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict):
        raise FinalError(f"{path}: not a qat_quant.json (no layers); final/ is damaged")
    return layers


def find_final(path: str | Path) -> Path | None:
    """``path/final`` for a run directory, ``path`` itself for a ``final/`` (or a fake export:
    config.json + qat_quant.json), else None."""
    p = Path(path)
    if (p / "final" / "config.json").is_file():
        return p / "final"
    if (p / "config.json").is_file() and (p / QUANT_FILE).is_file():
        return p
    return None


def read_qparams(final_dir: Path) -> dict[str, Tensor] | None:
    """``{"<layer>.weight_scale" / "<layer>.weight_zero_point": tensor}``, or None when absent."""
    path = side_file(final_dir, QPARAMS_FILE)
    return load_file(str(path)) if path.is_file() else None


def write_quant_files(out_dir: Path, layers: dict[str, dict], qparams: dict[str, Tensor]) -> None:
    """``qat_qparams.safetensors`` (when there are quantized layers) and ``qat_quant.json``."""
    if layers:
        save_side_file(qparams, out_dir, QPARAMS_FILE)
    write_json_atomic(out_dir / QUANT_FILE, {"layers": layers})


def add_quant_note(final_dir: Path, key: str, value) -> None:
    """Add ``key: value`` beside ``layers`` in ``qat_quant.json`` (e.g. NF4's note)."""
    path = Path(final_dir) / QUANT_FILE
    d = json.loads(path.read_text()) if path.exists() else {"layers": {}}
    d[key] = value
    write_json_atomic(path, d)


def write_scales(final_dir: Path, folds: dict[str, dict[str, Tensor]]) -> None:
    """``qat_scales.safetensors``: the per-channel factors PTQ folded into layers (AWQ)."""
    save_side_file({f"{n}.{k}": t.clone().contiguous() for n, d in folds.items() for k, t in d.items()}, final_dir, SCALES_FILE)


def has_adapter(final_dir: Path) -> bool:
    return (Path(final_dir) / ADAPTER_DIR / "adapter_config.json").is_file()


@contextmanager
def writing_final(final_dir: Path):
    """Yield a temporary directory to write ``final/`` into; on success it replaces ``final_dir``
    (the previous one is moved aside first and deleted after), on failure it is removed."""
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(f".{final_dir.name}.tmp-{os.getpid()}")
    old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
    olds = sorted(final_dir.parent.glob(f".{final_dir.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not final_dir.exists():  # killed between moving the previous one aside and renaming the new one in
        os.replace(olds.pop(), final_dir)
    for stale in [*final_dir.parent.glob(f".{final_dir.name}.tmp-*"), *olds]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed write (qat's own names)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)  # on disk before the previous final/ is replaced and deleted
        if final_dir.exists():
            os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        fsync_dir(final_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)



def _safetensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [model_dir / "model.safetensors"]


def _lora_scaling(cfg: dict, name: str) -> float:
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    for key, v in (cfg.get("rank_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            r = v
    for key, v in (cfg.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            alpha = v
    return alpha / (r**0.5 if cfg.get("use_rslora") else r)


@torch.no_grad()
def effective_weights(final_dir: str | Path, names: list[str] | None = None) -> dict[str, Tensor]:
    """``{layer: W_hat}`` (float32, CPU) of the quantized layers of a ``final/`` directory,
    including the LoRA correction of ``final/adapter`` when present."""
    from safetensors import safe_open

    final_dir = Path(final_dir)
    layers = load_quant_layers(final_dir)
    wanted = list(names if names is not None else layers)
    keys = {f"{n}.weight": n for n in wanted}
    experts = {n: layers[n]["shape"] for n in wanted if n in layers and layers[n].get("shape")}
    parts: dict[str, tuple[str, Tensor]] = {}  # per-expert checkpoint key -> (fused tensor, its rows)
    if experts:
        from .layout import checkpoint_rows, meta_model

        model = meta_model(final_dir)
        for n, shape in experts.items():
            parts.update({f"{k}.weight": (n, rows) for k, rows in checkpoint_rows(model, n, tuple(shape)).items()})
            keys.pop(f"{n}.weight", None)
    fused = {n: torch.zeros(math.prod(shape[:-1]), shape[-1]) for n, shape in experts.items()}
    out: dict[str, Tensor] = {}
    for f in _safetensor_files(final_dir):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if k in keys:
                    out[keys[k]] = st.get_tensor(k).float()
                elif k in parts:
                    n, rows = parts.pop(k)
                    fused[n][rows] = st.get_tensor(k).float()
    out.update({n: t.reshape(experts[n]) for n, t in fused.items() if not any(p[0] == n for p in parts.values())})
    missing = [n for n in wanted if n not in out]
    if missing:
        raise KeyError(f"{final_dir}: no weights for {missing[:3]}")
    adapter = final_dir / ADAPTER_DIR
    if (adapter / "adapter_config.json").exists():
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        factors: dict[str, dict[str, Tensor]] = {}
        for k, t in tensors.items():
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", k)
            if m:
                factors.setdefault(m.group(1), {})[m.group(2)] = t.float()
        for n, ab in factors.items():
            if n in out:
                out[n] = out[n] + _lora_scaling(cfg, n) * (ab["B"] @ ab["A"])
    if side_file(final_dir, SCALES_FILE).exists():
        for k, s in load_file(str(side_file(final_dir, SCALES_FILE))).items():
            n, _, kind = k.rpartition(".")
            if n in out:
                out[n] = out[n] * s.float().unsqueeze(1) if kind == "output_scale" else out[n] / s.float()
    return out
