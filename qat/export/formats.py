"""The writers: compressed-tensors pack-quantized, GPTQ v1, fake (dequantized weights + qparams)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from ..io.final import write_quant_files
from ..io.layout import checkpoint_names, drop_fused, rows_of
from ..quant.apply import DEFAULT_TARGETS
from ..quant.grid import dequantize
from ..quant.linear import QuantizedWeight
from .packing import check_compressed_tensors, check_gptq_layers, check_gptq_schemes, pack_rows, unsigned_codes, zero_points
from .source import _MODEL_FILES, ExportError, ExportSource, _scheme_key

FORMATS = ("compressed-tensors", "gptq", "fake")


def _tokenizer_files(final_dir: Path, out: Path) -> None:
    for f in final_dir.iterdir():
        if f.is_file() and f.name not in _MODEL_FILES and not f.name.endswith((".safetensors", ".bin")):
            shutil.copy2(f, out / f.name)


def _save_dense_parts(model: nn.Module, dtype: torch.dtype, out: Path) -> None:
    model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True)


def _ct_args(info: dict):
    from compressed_tensors.quantization import QuantizationArgs

    g = info["group_size"]
    return QuantizationArgs(
        num_bits=info["bits"],
        type="int",
        symmetric=info["symmetric"],
        strategy="channel" if g is None else "group",
        group_size=g,
    )


def ct_quantization_config(layers: dict[str, dict], model: nn.Module):
    """One config group per scheme (``targets: [Linear]`` when there is one scheme, else the layer
    names); every other Linear (lm_head, ...) is listed in ``ignore``."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    by_key: dict[tuple, list[str]] = {}
    for name, info in layers.items():
        by_key.setdefault(_scheme_key(info), []).append(name)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    groups = {}
    for i, (key, names) in enumerate(sorted(by_key.items(), key=lambda kv: str(kv[0]))):
        targets = ["Linear"] if len(by_key) == 1 else sorted(names)
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=_ct_args(layers[names[0]]))
    return QuantizationConfig(config_groups=groups, ignore=ignore)


def _exact(qw: QuantizedWeight) -> Tensor:
    """The exact fp32 product ``(u - z) * s``: compressed-tensors re-quantizes it to qat's codes exactly."""
    return dequantize(qw.codes, qw.scale.float(), qw.zero_point.float(), qw.scheme.group_size)


def _pack_experts(src: ExportSource) -> dict[str, dict[str, Tensor]]:
    """Per fused expert tensor, the per-expert compressed-tensors tensors (through
    compressed-tensors' own compressor, checked against qat's codes); the fused parameters are
    removed from ``src.model``."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    packed = {}
    for name, rows_by_key in src.expert_rows.items():
        qw = src.qweights[name]
        args = _ct_args(src.layers[name])
        scheme = QuantizationScheme(targets=["Linear"], weights=args)
        compressor = BaseCompressor.get_value_from_registry("pack-quantized")
        tensors = {}
        for key, rows in rows_by_key.items():
            one = rows_of(qw, rows)
            sd = {"weight": _exact(one), "weight_scale": one.scale.float()}
            if not args.symmetric:
                sd["weight_zero_point"] = (zero_points(one) - 2 ** (one.scheme.bits - 1)).to(torch.int8)
            sd = compressor.compress(sd, scheme)
            if not torch.equal(sd["weight_packed"], pack_rows(unsigned_codes(one), one.scheme.bits)):
                raise RuntimeError(f"compressed-tensors packed other codes than qat's for {key} (a numerics change in compressed-tensors?)")
            sd["weight_scale"] = one.scale.to(src.dtype)
            tensors.update({f"{key}.{k}": v.contiguous() for k, v in sd.items()})
        drop_fused(src.model, name)
        packed[name] = tensors
    return packed


@torch.no_grad()
def write_compressed_tensors(src: ExportSource, out: Path) -> dict:
    """Write ``src`` to ``out`` in compressed-tensors ``pack-quantized`` (consumes ``src.model``).
    Fused MoE experts are written as the per-expert modules of the checkpoint layout
    (``qat/io/layout.py``), as llm-compressor writes them and vLLM's MoE loader reads them."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    check_compressed_tensors(src.layers, src.any_bits)
    model = src.model
    experts = _pack_experts(src)
    linears = {n: qw for n, qw in src.qweights.items() if n not in experts}
    for name, qw in linears.items():
        model.get_submodule(name).weight.data = _exact(qw)
    qconfig = ct_quantization_config({n: src.layers[n] for n in linears}, model)
    apply_quantization_config(model, qconfig, show_progress=False)
    for name, qw in linears.items():
        m = model.get_submodule(name)
        m.weight_scale.data = qw.scale.float().reshape(m.weight_scale.shape)
        if hasattr(m, "weight_zero_point"):  # compressed-tensors' zero-points are signed
            zp = zero_points(qw) - 2 ** (qw.scheme.bits - 1)
            m.weight_zero_point.data = zp.to(m.weight_zero_point.dtype).reshape(m.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    for name, qw in linears.items():  # what compressed-tensors packed must be our codes
        m = model.get_submodule(name)
        if not torch.equal(m.weight_packed, pack_rows(unsigned_codes(qw), qw.scheme.bits)):
            raise RuntimeError(f"compressed-tensors packed other codes than qat's for {name} (a numerics change in compressed-tensors?)")
        if not qw.scheme.symmetric and not torch.equal(m.weight_zero_point, pack_rows(zero_points(qw).T, qw.scheme.bits).T):
            raise RuntimeError(f"compressed-tensors packed other zero-points than qat's for {name}")
    if hasattr(model, "ct_decompress_hook"):
        compressor.remove_decompression_hook(model)
    _save_dense_parts(model, src.dtype, out)
    compressor.update_config(str(out))
    if experts:
        add_weight_files(out, list(experts.values()))
        _config_with_experts(out, src.layers, src.expert_rows, model)
    # With one scheme, write transformers' loading attribute `dequantize: true` (vLLM reads only the
    # keys it knows): `from_pretrained` then dequantizes the packed tensors while loading (same
    # numerics as the default decompress-on-first-forward path) into a plain dense model. Needed
    # because (1) compressed-tensors 0.20 builds the *unpacked* zero-point shape when transformers
    # sets up a compressed model on the meta device, so the default load of an asymmetric
    # pack-quantized checkpoint fails with a size mismatch, and (2) peft cannot wrap the
    # still-compressed Linear layers (no `.weight`) for a separate adapter. With several schemes it
    # is not written: transformers 5.23's load-time dequantizer applies one config group's scheme
    # to every dense layer (`get_dense_scheme`), while the default path handles each group.
    notes = {}
    if len({_scheme_key(i) for i in src.layers.values()}) == 1:
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"]["dequantize"] = True
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        notes["load_hint"] = "quantization_config.dequantize=true: transformers dequantizes while loading (see qat/export/formats.py)"
    else:
        notes["load_hint"] = "none (mixed precision: transformers decompresses on the first forward)"
    return notes


def _config_with_experts(out: Path, layers: dict[str, dict], expert_names: dict[str, dict], model: nn.Module) -> None:
    """config.json's quantization_config with the experts in it: their per-expert modules join the
    config group of their scheme (a new group when no Linear shares it, or the groups name their
    layers), and the block matrices left in full precision that are not Linear (MoE routers) join
    ``ignore``: vLLM builds those as linear layers and would otherwise expect packed weights."""
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    qc = cfg["quantization_config"]
    groups = qc.setdefault("config_groups", {})
    for name, per_expert in expert_names.items():
        want = _ct_args(layers[name]).model_dump()
        group = next((g for g in groups.values() if all(g.get("weights", {}).get(k) == want[k] for k in ("num_bits", "group_size", "symmetric", "strategy"))), None)
        if group is None:
            group = groups[f"group_{len(groups)}"] = {"targets": [], "weights": want, "input_activations": None, "output_activations": None, "format": "pack-quantized"}
        if group["targets"] != ["Linear"]:
            group["targets"] = sorted(set(group["targets"]) | set(per_expert))
    quantized = {f"{n}.weight" for n in layers} | set(layers)
    routers = [p.removesuffix(".weight") for p, t in model.named_parameters()
               if t.ndim == 2 and p.endswith(".weight") and p not in quantized and re.search(DEFAULT_TARGETS[0], p)
               and not isinstance(model.get_submodule(p.removesuffix(".weight")), nn.Linear)]
    qc["ignore"] = sorted(set(qc.get("ignore") or []) | set(checkpoint_names(model, routers)))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def add_weight_files(out: Path, tensors: list[dict[str, Tensor]]) -> None:
    """Write more safetensors files into the model directory ``out`` and list every tensor in its
    ``model.safetensors.index.json``. A single ``model.safetensors`` becomes the first of the
    numbered shards: loaders read a lone ``model.safetensors`` without looking for an index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = out / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        names = [f"model-experts-{i + 1:05d}-of-{len(tensors):05d}.safetensors" for i in range(len(tensors))]
    else:
        n = len(tensors) + 1
        first = f"model-00001-of-{n:05d}.safetensors"
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            index = {"metadata": {}, "weight_map": dict.fromkeys(f.keys(), first)}
        os.replace(out / "model.safetensors", out / first)
        names = [f"model-{i + 2:05d}-of-{n:05d}.safetensors" for i in range(len(tensors))]
    for fname, part in zip(names, tensors):
        save_file(part, str(out / fname), metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(part, fname))
    index["metadata"]["total_size"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    index_path.write_text(json.dumps(index, indent=2))


@torch.no_grad()
def write_gptq(src: ExportSource, out: Path) -> dict:
    """Write ``src`` to ``out`` in the GPTQ v1 layout (symmetric, one scheme for every block Linear)."""
    bits, g = check_gptq_schemes(src.layers)  # fused experts refused there
    check_gptq_layers(src.layers, src.model)
    model = src.model
    for name, qw in src.qweights.items():
        lin = model.get_submodule(name)
        if lin.out_features * bits % 32:
            raise ExportError(f"gptq: layer {name}: out_features {lin.out_features} cannot be packed into qzeros words")
        packed = _GPTQLinear(qw, lin.bias, src.dtype)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, packed)
    _save_dense_parts(model, src.dtype, out)
    qcfg = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": -1 if g is None else g,
        "desc_act": False,
        "sym": True,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "checkpoint_format": "gptq",
        "meta": {"quantizer": ["qat"]},
    }
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = qcfg
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (out / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    return {}


class _GPTQLinear(nn.Module):
    """Holds one layer's GPTQ v1 tensors so that ``save_pretrained`` writes them under its name."""

    def __init__(self, qw: QuantizedWeight, bias: Tensor | None, dtype: torch.dtype):
        super().__init__()
        s = qw.scheme
        out_f, in_f = qw.codes.shape
        g = s.group_size or in_f
        self.register_buffer("qweight", pack_rows(unsigned_codes(qw), s.bits).T.contiguous())  # [in*b/32, out]
        self.register_buffer("qzeros", pack_rows(zero_points(qw).T - 1, s.bits).contiguous())  # [groups, out*b/32]
        self.register_buffer("scales", qw.scale.T.contiguous().to(dtype))  # [groups, out]
        self.register_buffer("g_idx", (torch.arange(in_f) // g).to(torch.int32))
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())


@torch.no_grad()
def write_fake(src: ExportSource, out: Path) -> dict:
    """Dequantized weights in ``src.dtype`` + ``qat_quant.json`` + ``qat/qparams.safetensors``."""
    _save_dense_parts(src.model, src.dtype, out)
    qparams = {}
    for name, qw in src.qweights.items():
        qparams[f"{name}.weight_scale"] = qw.scale.contiguous()
        qparams[f"{name}.weight_zero_point"] = qw.zero_point.contiguous()
    write_quant_files(out, src.layers, qparams)  # final/'s own format: a fake export reads like final/
    return {}


WRITERS = {"compressed-tensors": write_compressed_tensors, "gptq": write_gptq, "fake": write_fake}
