"""Packing integer codes into int32 words (compressed-tensors' and GPTQ's layouts), and the checks of
which schemes each format can hold."""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from ..io.final import QUANT_FILE
from ..quant.apply import DEFAULT_TARGETS
from ..quant.linear import QuantizedWeight
from .source import ExportError, _scheme_key, describe

SERVABLE_BITS = (4, 8)  # vLLM's WNA16 kernels (compressed-tensors and GPTQ paths) take int4 and int8


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


def _fake_hint(fmt: str) -> str:
    return f"export it with --format fake (dequantized weights + {QUANT_FILE}) instead of a {fmt} checkpoint that would differ"


def seq_as_int(info: dict, any_bits: bool = False) -> dict:
    """How a packed format holds a layer of SEQ's grid: its levels ``(u - (2^b - 1) / 2) * s`` are
    the odd codes ``c = 2u - (2^b - 1)`` of a symmetric integer grid with scale ``s / 2``, the same
    values bit for bit (halving a scale is exact). That grid has b + 1 bits, or the narrowest
    width serving engines run at least that wide (int4 for SEQ W2 and W3: 4 bits per weight for
    W2); ``any_bits`` keeps b + 1 (int3 for W2, packed densely, no vLLM kernel). Other layers as
    they are; a SEQ width with no such grid (8 bits) too, for ``check_servable`` to refuse."""
    from ..quant.scheme import SUPPORTED_BITS

    if info.get("grid") != "seq":
        return info
    wide = [b for b in SUPPORTED_BITS if b > info["bits"] and (any_bits or b in SERVABLE_BITS)]
    if not wide:
        return info
    return {**info, "bits": min(wide), "symmetric": True, "grid": "int", "seq_bits": info["bits"]}


def seq_codes_as_int(qw: QuantizedWeight, info: dict) -> QuantizedWeight:
    """A SEQ layer's codes and qparams on the symmetric grid ``seq_as_int`` chose (``info``)."""
    from ..quant.scheme import QuantScheme

    b = qw.scheme.bits
    scheme = QuantScheme(bits=info["bits"], group_size=info["group_size"], symmetric=True, act_bits=info.get("act_bits"))
    return QuantizedWeight(2 * qw.codes - (2**b - 1), qw.scale / 2, torch.zeros_like(qw.zero_point), scheme)


def check_servable(layers: dict[str, dict], fmt: str, any_bits: bool = False) -> None:
    """Refuse schemes a serving engine cannot take, naming the layers, and offer --format fake.
    ``any_bits``: allow int2/int3 (packed densely by compressed-tensors 0.20 and loaded back by
    transformers, but no vLLM kernel takes them; the int3 layout changed in compressed-tensors 2026)."""
    seq = [n for n, i in layers.items() if i.get("grid") == "seq"]  # left so by seq_as_int: no integer grid holds them
    if seq:
        raise ExportError(
            f"{fmt}: {len(seq)} layers are on SEQ's grid (quant.grid: seq) at {layers[seq[0]]['bits']} bits, whose levels no "
            f"integer grid of the widths {fmt} packs holds. {_fake_hint(fmt)[0].upper() + _fake_hint(fmt)[1:]}, or train on "
            "an integer grid (quant.grid: int)."
        )
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
    check_experts(layers)
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
    check_no_experts(layers)
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
    bits, g = next(iter(keys))[:2]
    return bits, g


def check_experts(layers: dict[str, dict]) -> None:
    """Fused MoE experts: symmetric, and one scheme for all the expert tensors of a block. vLLM's
    MoE methods take one scheme for gate, up and down (``get_moe_method`` checks it) and its WNA16
    Marlin MoE kernel asserts symmetric weights; transformers' loader of per-expert
    compressed-tensors weights reads no zero-points."""
    experts = {n: i for n, i in layers.items() if i.get("experts")}
    asym = [n for n, i in experts.items() if not i["symmetric"]]
    if asym:
        raise ExportError(
            f"compressed-tensors: {len(asym)} fused expert tensors are asymmetric (e.g. {asym[0]}); MoE loaders take "
            f"symmetric experts only (vLLM's WNA16 MoE kernels, transformers' per-expert loader). Train the experts with "
            f"quant.symmetric: true (a quant.overrides entry for 'experts'), or {_fake_hint('compressed-tensors')}."
        )
    by_module: dict[str, set] = {}
    for n, i in experts.items():
        by_module.setdefault(n.rpartition(".")[0], set()).add(_scheme_key(i))
    mixed = [m for m, keys in by_module.items() if len(keys) > 1]
    if mixed:
        raise ExportError(
            f"compressed-tensors: the expert tensors of {mixed[0]} use different schemes; vLLM's MoE layers take one scheme "
            f"for gate, up and down. Give them one scheme, or {_fake_hint('compressed-tensors')}."
        )


def check_no_experts(layers: dict[str, dict]) -> None:
    """GPTQ v1 checkpoints hold Linear layers; fused MoE experts go to compressed-tensors."""
    experts = [n for n, i in layers.items() if i.get("experts")]
    if experts:
        raise ExportError(
            f"gptq: {len(experts)} quantized tensors are fused MoE experts (e.g. {experts[0]}); qat writes them as "
            "per-expert compressed-tensors modules: use --format compressed-tensors (vLLM's MoE kernels read it)"
        )


def check_gptq_layers(layers: dict[str, dict], model: nn.Module) -> None:
    """GPTQ loaders quantize every Linear of the transformer blocks and nothing else."""

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
