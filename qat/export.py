"""Export a run's ``final/`` as a real packed low-bit checkpoint, bit-exact with what was trained.

``final/`` holds the on-grid (dequantized) weights plus ``qat_quant.json`` and
``qat_qparams.safetensors`` (scale and zero-point of every quantized layer, in final/'s dtype).
Export recovers the integer codes from them, checks that they reproduce final/'s weights bit for
bit, and writes one of:

- ``compressed-tensors``: the ``pack-quantized`` format (what vLLM's compressed-tensors path
  serves), written *by the compressed-tensors library* (``apply_quantization_config``, our
  scales / zero-points, ``ModelCompressor.compress_model``, ``save_pretrained``,
  ``update_config``). int4 and int8, symmetric and asymmetric, group and per-channel;
  mixed int4/int8 becomes one config group per scheme. Embeddings, lm_head and norms stay in the
  model dtype.
- ``gptq``: the GPTQ v1 layout (``qweight``, ``qzeros``, ``scales``, ``g_idx``), symmetric only.
- ``fake``: dequantized weights + ``qat_quant.json`` + ``qat_qparams.safetensors`` (any scheme,
  int2/int3 included; what no serving engine packs).

Both packed layouts go through one packing helper, ``pack_rows`` (compressed-tensors'
``pack_to_int32``): compressed-tensors' ``weight_packed`` is ``pack_rows(codes)``, GPTQ's
``qweight`` is its transpose (for int4/int8 symmetric the two are the same bits).

Numerics. Codes are those of ``qat/quant/grid.py``: unsigned ``u`` with ``w = (u - z) * s``,
computed in the scale's dtype (= final/'s dtype); compressed-tensors stores signed codes and
zero-points (``u - 2^(b-1)``, ``z - 2^(b-1)``) and dequantizes ``(q - z) * s`` in the scale's
dtype too, so the loaded weights are identical. Compression runs in float32 on the exact product
``(u - z) * s`` (exact in fp32 for bf16 scales), so compressed-tensors' re-quantization returns
our codes; the packed tensors are checked against ``pack_rows`` before anything is written.

Low-rank terms (``final/adapter/``, a PEFT adapter, e.g. QERA): merging them moves the weights
off the integer grid, so they are copied beside the packed base as ``adapter/``. With
``merge_lora`` the adapter is merged in float32, every quantized layer is re-quantized with its
scheme (``minmax_qparams`` on the merged weight, same group size) and the logit change this
causes is measured on a few validation sequences.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .deps import available, require
from .final import QPARAMS_FILE, QUANT_FILE
from .quant.grid import dequantize, minmax_qparams, quantize
from .quant.linear import QuantizedWeight
from .quant.scheme import QuantScheme

FORMATS = ("compressed-tensors", "gptq", "fake")
SERVABLE_BITS = (4, 8)  # vLLM's WNA16 kernels (compressed-tensors and GPTQ paths) take int4 and int8
ADAPTER_DIR = "adapter"
EXPORT_INFO = "qat_export.json"
_MODEL_FILES = ("config.json", "generation_config.json", QUANT_FILE, QPARAMS_FILE, "model.safetensors.index.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """A run or scheme that cannot be exported in the requested format (the CLI: exit code 2)."""


# -- the source: final/ as codes + qparams ----------------------------------------------------
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


def resolve_run(run_dir: str | os.PathLike) -> tuple[Path | None, Path]:
    """``RUN_DIR`` (holding ``final/``) or ``RUN_DIR/final`` itself -> (run_dir, final_dir)."""
    p = Path(run_dir)
    if not p.exists():
        raise ExportError(f"{p}: no such run directory")
    if (p / "final" / "config.json").is_file():
        return p, p / "final"
    if (p / "config.json").is_file() and (p / QUANT_FILE).is_file():
        return (p.parent if p.name == "final" else None), p
    raise ExportError(f"{p}: not a qat run directory (no final/config.json; run `qat train` first)")


def _scheme(info: dict) -> QuantScheme:
    return QuantScheme(bits=info["bits"], group_size=info["group_size"], symmetric=info["symmetric"], act_bits=info.get("act_bits"))


def _scheme_key(info: dict) -> tuple:
    return (info["bits"], info["group_size"], info["symmetric"])


def describe(key: tuple) -> str:
    bits, g, sym = key
    return f"int{bits} {'per-channel' if g is None else f'group {g}'} {'sym' if sym else 'asym'}"


def read_layers(final_dir: Path) -> dict[str, dict]:
    path = final_dir / QUANT_FILE
    if not path.is_file():
        raise ExportError(f"{final_dir}: no {QUANT_FILE} (was final/ written by qat?)")
    layers = json.loads(path.read_text()).get("layers", {})
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
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run, final = resolve_run(run_dir)
    layers = read_layers(final)
    qp_path = final / QPARAMS_FILE
    if not qp_path.is_file():
        raise ExportError(f"{final}: no {QPARAMS_FILE}; the integer codes cannot be recovered")
    qparams = load_file(str(qp_path))
    dtype = _final_dtype(final, qparams)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    qweights = {}
    for name, info in layers.items():
        try:
            scale, zero = qparams[f"{name}.weight_scale"], qparams[f"{name}.weight_zero_point"]
            module = model.get_submodule(name)
        except (KeyError, AttributeError):
            raise ExportError(f"{final}: layer {name} of {QUANT_FILE} is missing from the model or {QPARAMS_FILE}") from None
        scheme = _scheme(info)
        codes = recover_codes(module.weight, scale, zero, scheme, dtype, name)
        qweights[name] = QuantizedWeight(codes, scale, zero, scheme)
    adapter = final / ADAPTER_DIR
    adapter = adapter if (adapter / "adapter_config.json").is_file() else None
    return ExportSource(run, final, model, dtype, layers, qweights, adapter)


# -- packing (shared by the compressed-tensors check and the GPTQ writer) ----------------------
def unsigned_codes(qw: QuantizedWeight) -> Tensor:
    """qat codes -> unsigned ``[0, 2^b - 1]`` (symmetric codes are signed in qat)."""
    s = qw.scheme
    return qw.codes + (2 ** (s.bits - 1) if s.symmetric else 0)


def pack_rows(values: Tensor, bits: int) -> Tensor:
    """Pack unsigned ``bits``-bit integers ``[rows, cols]`` along each row into int32
    ``[rows, cols * bits / 32]``, low bits first: compressed-tensors' ``pack_to_int32`` (which
    takes signed int8 values offset by ``2^(b-1)``). For 2/4/8 bits this is also GPTQ v1's layout."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    off = 2 ** (bits - 1)
    if values.min() < 0 or values.max() > 2**bits - 1:
        raise ValueError(f"pack_rows: values outside [0, {2**bits - 1}]")
    if (values.shape[-1] * bits) % 32:
        raise ValueError(f"pack_rows: {values.shape[-1]} values of {bits} bits do not fill whole int32 words")
    return pack_to_int32((values.to(torch.int32) - off).to(torch.int8), bits)


def zero_points(qw: QuantizedWeight) -> Tensor:
    """Unsigned integer zero-points ``[out, n_groups]`` (``2^(b-1)`` for symmetric)."""
    s = qw.scheme
    z = qw.zero_point.round().to(torch.int32)
    return z + (2 ** (s.bits - 1) if s.symmetric else 0)


# -- checks --------------------------------------------------------------------------------
def _fake_hint(fmt: str) -> str:
    return f"export it with --format fake (dequantized weights + {QUANT_FILE}) instead of a {fmt} checkpoint that would differ"


def check_servable(layers: dict[str, dict], fmt: str, any_bits: bool = False) -> None:
    """Refuse schemes a serving engine cannot take, naming the layers, and offer --format fake.
    ``any_bits``: allow int2/int3 (packed densely by compressed-tensors 0.20 and loaded back by
    transformers, but no vLLM kernel takes them; the int3 layout changed in compressed-tensors 2026)."""
    bad_bits = {} if any_bits else {n: i["bits"] for n, i in layers.items() if i["bits"] not in SERVABLE_BITS}
    if bad_bits:
        bits = sorted(set(bad_bits.values()))
        mixed = len(bad_bits) < len(layers)
        shown = ", ".join(list(bad_bits)[:3]) + (" ..." if len(bad_bits) > 3 else "")
        raise ExportError(
            f"{fmt}: {len(bad_bits)} of {len(layers)} quantized layers are int{'/int'.join(map(str, bits))}"
            f"{' (mixed precision)' if mixed else ''}, e.g. {shown}; serving engines (vLLM's compressed-tensors "
            f"and GPTQ kernels) take int4 and int8 weights only. {_fake_hint(fmt)[0].upper() + _fake_hint(fmt)[1:]}."
        )
    act = [n for n, i in layers.items() if i.get("act_bits")]
    if act:
        raise ExportError(
            f"{fmt}: {len(act)} layers fake-quantize activations (act_bits=8, per-token absmax/127), which "
            f"{fmt} does not express with these numerics (and final/ does not either); {_fake_hint(fmt)}."
        )


def check_compressed_tensors(layers: dict[str, dict], any_bits: bool = False) -> None:
    check_servable(layers, "compressed-tensors", any_bits)
    keys = {_scheme_key(i) for i in layers.values()}
    if len(keys) > 1 and any(not k[2] for k in keys):
        raise ExportError(
            f"compressed-tensors: mixed precision ({'; '.join(describe(k) for k in sorted(keys, key=str))}) with asymmetric "
            "layers cannot be loaded back exactly by transformers 5.23 + compressed-tensors 0.20 (the default load fails on "
            "packed asymmetric zero-points, the dequantize=True load applies one scheme to every layer), so qat does not "
            f"write it. Use one scheme, symmetric mixed precision, or {_fake_hint('compressed-tensors')}."
        )


def check_gptq_schemes(layers: dict[str, dict]) -> tuple[int, int | None]:
    """GPTQ v1: int4/int8, symmetric, one (bits, group_size) for every layer."""
    check_servable(layers, "gptq")
    asym = [n for n, i in layers.items() if not i["symmetric"]]
    if asym:
        raise ExportError(
            f"gptq: {len(asym)} layers are asymmetric; GPTQ v1 stores zero-1 in qzeros, which overflows for a zero-point "
            "of 0, so qat writes symmetric GPTQ only. Export asymmetric schemes with --format compressed-tensors."
        )
    keys = {_scheme_key(i) for i in layers.values()}
    if len(keys) > 1:
        raise ExportError(
            f"gptq: the layers use {len(keys)} schemes ({'; '.join(describe(k) for k in sorted(keys, key=str))}); a GPTQ v1 "
            "config has one bits/group_size. Use --format compressed-tensors (one config group per scheme)."
        )
    bits, g, _ = next(iter(keys))
    return bits, g


def check_gptq_layers(layers: dict[str, dict], model: nn.Module) -> None:
    """GPTQ loaders quantize every Linear of the transformer blocks and nothing else."""
    from .quant.apply import DEFAULT_TARGETS

    block = re.compile(DEFAULT_TARGETS[0])
    in_blocks = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and block.search(n)}
    if in_blocks != set(layers):
        missing = sorted(in_blocks - set(layers))[:3]
        extra = sorted(set(layers) - in_blocks)[:3]
        raise ExportError(
            "gptq: GPTQ loaders quantize every Linear of the transformer blocks and nothing else, but this run "
            f"quantized a different set (unquantized in blocks: {missing or '-'}; quantized outside: {extra or '-'}). "
            "Use --format compressed-tensors, which lists the layers it quantizes."
        )


# -- writers -------------------------------------------------------------------------------
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


@torch.no_grad()
def write_compressed_tensors(src: ExportSource, out: Path) -> dict:
    """Write ``src`` to ``out`` in compressed-tensors ``pack-quantized`` (consumes ``src.model``)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    check_compressed_tensors(src.layers, src.any_bits)
    model = src.model
    # the exact fp32 product (u - z) * s: compressed-tensors re-quantizes it to our codes exactly
    for name, qw in src.qweights.items():
        model.get_submodule(name).weight.data = dequantize(qw.codes, qw.scale.float(), qw.zero_point.float(), qw.scheme.group_size)
    qconfig = ct_quantization_config(src.layers, model)
    apply_quantization_config(model, qconfig, show_progress=False)
    for name, qw in src.qweights.items():
        m = model.get_submodule(name)
        m.weight_scale.data = qw.scale.float().reshape(m.weight_scale.shape)
        if hasattr(m, "weight_zero_point"):  # compressed-tensors' zero-points are signed
            zp = zero_points(qw) - 2 ** (qw.scheme.bits - 1)
            m.weight_zero_point.data = zp.to(m.weight_zero_point.dtype).reshape(m.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    for name, qw in src.qweights.items():  # what compressed-tensors packed must be our codes
        m = model.get_submodule(name)
        if not torch.equal(m.weight_packed, pack_rows(unsigned_codes(qw), qw.scheme.bits)):
            raise RuntimeError(f"compressed-tensors packed other codes than qat's for {name} (a numerics change in compressed-tensors?)")
        if not qw.scheme.symmetric and not torch.equal(m.weight_zero_point, pack_rows(zero_points(qw).T, qw.scheme.bits).T):
            raise RuntimeError(f"compressed-tensors packed other zero-points than qat's for {name}")
    if hasattr(model, "ct_decompress_hook"):
        compressor.remove_decompression_hook(model)
    _save_dense_parts(model, src.dtype, out)
    compressor.update_config(str(out))
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
        notes["load_hint"] = "quantization_config.dequantize=true: transformers dequantizes while loading (see qat/export.py)"
    else:
        notes["load_hint"] = "none (mixed precision: transformers decompresses on the first forward)"
    return notes


@torch.no_grad()
def write_gptq(src: ExportSource, out: Path) -> dict:
    """Write ``src`` to ``out`` in the GPTQ v1 layout (symmetric, one scheme for every block Linear)."""
    bits, g = check_gptq_schemes(src.layers)
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
    """Dequantized weights in ``src.dtype`` + ``qat_quant.json`` + ``qat_qparams.safetensors``."""
    from safetensors.torch import save_file

    _save_dense_parts(src.model, src.dtype, out)
    qparams = {}
    for name, qw in src.qweights.items():
        qparams[f"{name}.weight_scale"] = qw.scale.contiguous()
        qparams[f"{name}.weight_zero_point"] = qw.zero_point.contiguous()
    save_file(qparams, str(out / QPARAMS_FILE))
    (out / QUANT_FILE).write_text(json.dumps({"layers": src.layers}, indent=1))
    return {}


WRITERS = {"compressed-tensors": write_compressed_tensors, "gptq": write_gptq, "fake": write_fake}


# -- LoRA: keep separate, or merge and re-quantize ------------------------------------------
@torch.no_grad()
def sample_ids(src: ExportSource, n: int = 4, seq_len: int = 128) -> tuple[Tensor, str]:
    """A few validation sequences: the run's validation documents if they can be read, else a
    seeded random draw of token ids (the returned string says which)."""
    vocab = src.model.config.vocab_size
    try:
        import yaml
        from transformers import AutoTokenizer

        from .data import load_documents
        from .recipe import validate

        recipe = validate(yaml.safe_load((src.run_dir / "recipe.yaml").read_text()))
        docs = load_documents(recipe.data, "valid")
        tok = AutoTokenizer.from_pretrained(src.final_dir)
        ids: list[int] = []
        for d in docs or []:
            ids += tok(d, add_special_tokens=False)["input_ids"]
            if len(ids) >= n * seq_len:
                break
        if len(ids) >= n * seq_len:
            return torch.tensor(ids[: n * seq_len]).view(n, seq_len), f"{n} x {seq_len} validation tokens"
    except Exception:
        pass
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, seq_len), generator=g), f"{n} x {seq_len} random token ids (validation data not readable)"


@torch.no_grad()
def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids).logits.float()


@torch.no_grad()
def merge_lora(src: ExportSource, ids: Tensor) -> dict:
    """Merge ``src.adapter_dir`` into ``src.model`` and re-quantize every quantized layer (in place).
    Returns the logit change vs base + adapter (unmerged), both run in final/'s dtype."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ExportError("--merge-lora needs peft (pip install 'qat[peft]')") from None
    if src.adapter_dir is None:
        raise ExportError(f"--merge-lora: {src.final_dir} has no {ADAPTER_DIR}/ (PEFT adapter) to merge")
    ref = PeftModel.from_pretrained(copy.deepcopy(src.model).to(src.dtype), str(src.adapter_dir)).eval()
    unmerged = _logits(ref, ids)
    with ref.disable_adapter():
        base = _logits(ref, ids)
    del ref
    peft_model = PeftModel.from_pretrained(src.model, str(src.adapter_dir))
    prefix = "base_model.model."
    touched = {n.removeprefix(prefix) for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    merged = peft_model.merge_and_unload().eval()
    requantized = sorted(touched & set(src.qweights))
    for name in requantized:  # layers the adapter does not touch keep their codes and qparams
        s = src.qweights[name].scheme
        lin = merged.get_submodule(name)
        w = lin.weight.detach().float()
        scale, zero = minmax_qparams(w, s.bits, s.group_size, s.symmetric)
        codes = quantize(w, scale, zero, s.bits, s.symmetric, s.group_size)
        new = QuantizedWeight(codes, scale.to(src.dtype), zero.to(src.dtype), s)
        lin.weight.data = new.dequantize(src.dtype).float()
        src.qweights[name] = new
    src.model = merged
    after = _logits(copy.deepcopy(merged).to(src.dtype), ids)
    diff = (after - unmerged).abs()
    return {
        "max_abs_logit_change": diff.max().item(),
        "mean_abs_logit_change": diff.mean().item(),
        "adapter_effect_max_abs": (unmerged - base).abs().max().item(),
        "adapter_effect_mean_abs": (unmerged - base).abs().mean().item(),
        "tokens": int(ids.numel()),
        "requantized_layers": len(requantized),
        "adapter_layers_left_in_full_precision": sorted(touched - set(src.qweights)),
    }


# -- sizes and eval.json ---------------------------------------------------------------------
def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _headers(path: Path) -> dict[str, dict]:
    """name -> safetensors header entry (dtype, shape, data_offsets) over the model's files."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name == QPARAMS_FILE:
            continue
        with open(f, "rb") as h:
            n = int.from_bytes(h.read(8), "little")
            header = json.loads(h.read(n))
        out.update({k: v for k, v in header.items() if k != "__metadata__"})
    return out


def weights_bytes(path: Path) -> int:
    """Bytes of the model's safetensors files (headers included; adapter/ and qat_qparams excluded)."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors") if f.name != QPARAMS_FILE)


def bf16_bytes(final_dir: Path) -> int:
    """2 bytes x every parameter stored in final/'s model safetensors files (tensor data only)."""
    return 2 * sum(math.prod(v["shape"]) for v in _headers(final_dir).values())


def layer_bytes(path: Path, layers) -> int:
    """Tensor bytes stored under the given layer names (packed weights, scales, zero-points, ...)."""
    prefixes = tuple(f"{n}." for n in layers)
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in _headers(path).items() if k.startswith(prefixes))


def bf16_layer_bytes(final_dir: Path, layers) -> int:
    names = {f"{n}.weight" for n in layers} | {f"{n}.bias" for n in layers}
    return 2 * sum(math.prod(v["shape"]) for k, v in _headers(final_dir).items() if k in names)


def record_eval(run_dir: Path, key: str, info: dict) -> None:
    """Merge ``info`` into ``RUN_DIR/eval.json`` under ``"export"`` / ``key``, atomically."""
    path = run_dir / "eval.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("export", {})[key] = info
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


# -- the whole command ------------------------------------------------------------------------
def export(
    run_dir: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike | None = None,
    merge: bool = False,
    overwrite: bool = False,
    verify: bool = False,
    log=print,
    any_bits: bool = False,
) -> dict:
    """``qat export``: read the run, write ``out`` (atomically: a temp dir renamed at the end),
    keep or merge the adapter, record sizes in eval.json. Returns the eval.json entry."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    run, final = resolve_run(run_dir)
    layers = read_layers(final)
    if fmt in ("compressed-tensors", "gptq"):  # both pack with compressed-tensors' pack_to_int32
        require("compressed_tensors", f"qat export --format {fmt}")
    if (final / ADAPTER_DIR / "adapter_config.json").is_file() and (merge or verify):
        require("peft", "a run with a LoRA adapter (final/adapter)")
    if fmt == "gptq":  # the cheap checks, before any weights load
        check_gptq_schemes(layers)
    elif fmt == "compressed-tensors":
        check_compressed_tensors(layers, any_bits)
    out = Path(out) if out is not None else (run or final.parent) / f"export-{fmt}"
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out}: exists and is not empty; pass --overwrite to replace it")
    if out.resolve() == final.resolve() or final.resolve() in out.resolve().parents:
        raise ExportError(f"--out {out}: must not be inside final/")

    t0 = time.perf_counter()
    src = load_source(run or final)
    src.any_bits = any_bits
    merge_info = None
    if merge:
        ids, what = sample_ids(src)
        merge_info = merge_lora(src, ids)
        merge_info["sequences"] = what
    keys = sorted({_scheme_key(i) for i in layers.values()}, key=str)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        notes = WRITERS[fmt](src, tmp)
        _tokenizer_files(final, tmp)
        adapter_note = None
        if src.adapter_dir is not None and not merge:
            shutil.copytree(src.adapter_dir, tmp / ADAPTER_DIR)
            cfg_path = tmp / ADAPTER_DIR / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = str(out.resolve())
            cfg_path.write_text(json.dumps(cfg, indent=2))
            adapter_note = "kept separate (PEFT format): merging low-rank terms moves weights off the integer grid"
            if fmt == "compressed-tensors" and "none" in notes.get("load_hint", ""):
                adapter_note += " (mixed precision: run one forward pass on the loaded base before wrapping it with peft)"
        info = {
            "format": fmt,
            "out": str(out),
            "schemes": [describe(k) for k in keys],
            "quantized_layers": len(layers),
            "frozen_layers": sum(bool(i.get("frozen")) for i in layers.values()),
            "dtype": str(src.dtype).removeprefix("torch."),
            "bytes": None,
            "weights_bytes": weights_bytes(tmp),
            "adapter_bytes": dir_bytes(tmp / ADAPTER_DIR) if (tmp / ADAPTER_DIR).is_dir() else 0,
            "bf16_weights_bytes": bf16_bytes(final),
            "bf16_basis": "2 bytes x parameters stored in final/ (tensor data, no headers)",
            "quantized_layers_bytes": layer_bytes(tmp, layers),
            "quantized_layers_bf16_bytes": bf16_layer_bytes(final, layers),
            **notes,
        }
        if adapter_note:
            info["adapter"] = adapter_note
        if merge_info:
            info["merge_lora"] = merge_info
        (tmp / EXPORT_INFO).write_text(json.dumps({**info, "source": str(final.resolve()), "layers": layers}, indent=1))
        info["bytes"] = dir_bytes(tmp)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["ratio_vs_bf16"] = info["weights_bytes"] / info["bf16_weights_bytes"]
    info["seconds"] = round(time.perf_counter() - t0, 2)

    log(f"exported {final} -> {out} ({fmt}; {', '.join(info['schemes'])}; {len(layers)} quantized layers, "
        f"{info['frozen_layers']} frozen; {info['dtype']})")
    log(f"size on disk: weights {human(info['weights_bytes'])} vs bf16 {human(info['bf16_weights_bytes'])} "
        f"({info['ratio_vs_bf16']:.3f}x); quantized layers {human(info['quantized_layers_bytes'])} vs bf16 "
        f"{human(info['quantized_layers_bf16_bytes'])} ({info['quantized_layers_bytes'] / info['quantized_layers_bf16_bytes']:.3f}x); "
        f"whole directory {human(info['bytes'])}"
        + (f", adapter {human(info['adapter_bytes'])}" if info["adapter_bytes"] else ""))
    if adapter_note:
        log(f"LoRA adapter {adapter_note}; it is in {out / ADAPTER_DIR} (load it with peft on top of the packed base, "
            "or pass --merge-lora to merge and re-quantize)")
    if merge_info:
        log(f"--merge-lora: merged the adapter and re-quantized the {merge_info['requantized_layers']} quantized layers it touches "
            f"(minmax qparams of the merged weight, same scheme); logit change vs base + adapter "
            f"on {merge_info['sequences']}: max {merge_info['max_abs_logit_change']:.4g}, mean "
            f"{merge_info['mean_abs_logit_change']:.4g} (the adapter itself moves logits by max "
            f"{merge_info['adapter_effect_max_abs']:.4g}, mean {merge_info['adapter_effect_mean_abs']:.4g})")
    if verify:
        info["verify"] = verify_export(out, fmt, final, merged=merge)
        v = info["verify"]
        log(f"verify: {v['what']}: max abs difference {v['max_abs_diff']:.3g} ({'identical' if v['identical'] else 'DIFFERENT'})")
        if "loader" in v:
            log(f"verify: {v['loader']}")
    if run is not None:
        record_eval(run, fmt, info)
    return info


GPTQ_LOADER = ("optimum", "gptqmodel")  # what transformers' GPTQ loader imports (gptqmodel 7.7 wants torch >= 2.14.1)


def gptq_loader_missing() -> list[str]:
    """The packages transformers needs to load a GPTQ checkpoint that are not installed."""
    return [p for p in GPTQ_LOADER if not available(p)]


@torch.no_grad()
def verify_export(out: Path, fmt: str, final: Path, merged: bool = False) -> dict:
    """Load the export back and compare with final/: logits (compressed-tensors, fake); for GPTQ the
    unpacked tensors against final/'s weights (bit for bit) and, when optimum and gptqmodel are
    installed, the logits of transformers' own GPTQ loader (its kernels compute in their own
    precision, so that difference is reported, not required to be 0)."""
    from transformers import AutoModelForCausalLM

    if merged:
        return {"what": "skipped (a merged export differs from final/ by design)", "max_abs_diff": float("nan"), "identical": False}
    ref = AutoModelForCausalLM.from_pretrained(final).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ref.config.vocab_size, (2, 64), generator=g)
    if fmt == "gptq":
        from safetensors.torch import load_file

        state = {}
        for f in out.glob("*.safetensors"):
            state.update(load_file(str(f)))
        worst = 0.0
        for name, w in gptq_dequantize(state).items():
            worst = max(worst, (w.float() - ref.get_submodule(name).weight.float()).abs().max().item())
        res = {"what": "gptq tensors unpacked vs final/ weights", "max_abs_diff": worst, "identical": worst == 0.0}
        missing = gptq_loader_missing()
        if missing:
            res["loader"] = (f"not run: transformers loads GPTQ through optimum and gptqmodel; missing {', '.join(missing)} "
                             "(pip install optimum gptqmodel)")
        else:
            model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
            d = (_logits(model, ids) - _logits(ref, ids)).abs().max().item()
            res["loader"] = f"transformers + optimum + gptqmodel: logits vs final/ on 2 x 64 tokens, max abs difference {d:.3g}"
            res["loader_max_abs_diff"] = d
        return res
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    d = (_logits(model, ids) - _logits(ref, ids)).abs().max().item()
    return {"what": "logits of the export (transformers) vs final/ on 2 x 64 tokens", "max_abs_diff": d, "identical": d == 0.0}


def gptq_dequantize(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weights ``[out, in]`` from GPTQ v1 tensors (bits from the qweight shape): the reference
    decoder, written from the layout (shifts), independent of ``pack_rows``."""
    out = {}
    for key in state:
        if not key.endswith(".qweight"):
            continue
        name = key.removesuffix(".qweight")
        qweight, qzeros, scales, g_idx = (state[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
        in_f = g_idx.numel()
        bits = qweight.shape[0] * 32 // in_f
        per = 32 // bits
        mask = 2**bits - 1
        shifts = torch.arange(per, dtype=torch.int32) * bits
        q = ((qweight.unsqueeze(1) >> shifts.view(1, per, 1)) & mask).reshape(in_f, -1)  # [in, out]
        z = ((qzeros.unsqueeze(2) >> shifts.view(1, 1, per)) & mask).reshape(qzeros.shape[0], -1) + 1  # [groups, out]
        gi = g_idx.long()
        w = (q.to(scales.dtype) - z[gi].to(scales.dtype)) * scales[gi]
        out[name] = w.T.contiguous()
    return out
