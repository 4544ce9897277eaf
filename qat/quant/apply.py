"""Wrap a model's Linear layers with fake-quant, and turn a wrapped model back into a plain one.

``quantize_model`` selects layers by regex on their qualified names (``re.search``): a layer is
wrapped if it matches a ``targets`` pattern and no ``ignore`` pattern. The default target is
every Linear inside the stack of transformer blocks (``...layers.N.``, ``...h.N.``,
``...blocks.N.``) except MoE routing layers (``DEFAULT_IGNORE``), so ``lm_head``, embeddings and
routers stay in full precision unless a pattern asks for them. ``layer_schemes`` (pattern -> scheme, first match wins) gives mixed precision.
"""

from __future__ import annotations

import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .fused import KERNELS
from .grid import minmax_qparams, mse_clip_ratio
from .experts import QATExpertWeight, check_expert_scheme, check_layout, expert_tensors, unwrap_expert_tensor, wrap_expert_tensor
from .linear import QATLinear, group_count
from .scheme import QuantConfigError, QuantScheme

DEFAULT_TARGETS: tuple[str, ...] = (r"(^|\.)(layers|h|blocks|block)\.\d+\.",)
# MoE routing layers the default targets leave out, as llm-compressor's MoE recipes do: a router
# or a shared expert's gate is a few rows wide (Qwen2-MoE's shared_expert_gate: 1), decides the
# routing, and vLLM builds it as a plain (unquantized) linear layer
DEFAULT_IGNORE: tuple[str, ...] = (r"(^|\.)(gate|router|shared_expert_gate)$",)


@dataclass
class QuantReport:
    """What ``quantize_model`` wrapped (name -> scheme), what it left alone, and how much of the
    transformer blocks' weights that is, in parameters."""

    layers: dict[str, QuantScheme] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # Linear layers, expert tensors and other block matrices left in full precision
    experts: dict[str, int] = field(default_factory=dict)  # fused expert tensor -> number of experts
    block_params: int = 0  # weights of matrices inside the transformer blocks
    quantized_block_params: int = 0

    WARN_BELOW = 0.95  # share of the block weights under which the summary warns

    @property
    def block_share(self) -> float:
        return self.quantized_block_params / self.block_params if self.block_params else 1.0

    def summary(self) -> str:
        counts = Counter(
            (s.bits, s.group_size, s.symmetric, s.scale_init, s.learnable, s.act_bits, s.grid) for s in self.layers.values()
        )
        n_lin = len(self.layers) - len(self.experts)
        what = f"{n_lin} Linear"
        if self.experts:
            per = sorted(set(self.experts.values()))
            what += f", {len(self.experts)} expert tensors x {'/'.join(map(str, per))} experts"
        lines = [f"quantized {100 * self.block_share:.1f}% of block weights ({what}), left {len(self.skipped)} in full precision"]
        for (bits, g, sym, init, learn, act, grid), n in sorted(counts.items(), key=lambda kv: -kv[1]):
            gran = "per-channel" if g is None else f"group {g}"
            extra = (", learnable qparams" if learn else "") + (f", int{act} activations" if act else "")
            kind = "seq grid" if grid == "seq" else "sym" if sym else "asym"
            lines.append(f"  {n:4d} x W{bits} {gran} {kind} init={init}{extra}")
        if self.skipped:
            shown = _collapse(self.skipped)
            lines.append(f"  full precision: {', '.join(shown[:6])}{' ...' if len(shown) > 6 else ''}")
        if self.block_share < self.WARN_BELOW:
            lines.append(
                f"WARNING: {100 * (1 - self.block_share):.1f}% of the transformer blocks' weights stay in full precision "
                f"({', '.join(_collapse([n for n in self.skipped if _in_blocks(n)])[:4])}); quant.targets / quant.ignore decide this"
            )
        return "\n".join(lines)


def _collapse(names: list[str]) -> list[str]:
    """Names with their block index replaced by ``*``, each once, in order."""
    out: list[str] = []
    for n in names:
        c = re.sub(r"(^|\.)(layers|h|blocks|block)\.\d+\.", r"\1\2.*.", n)
        if c not in out:
            out.append(c)
    return out


def _in_blocks(name: str) -> bool:
    return any(re.search(p, name + ".") for p in DEFAULT_TARGETS)


def _compile(patterns, key: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise QuantConfigError(f"{key}: invalid regex {p!r}: {e}") from None
    return out


def quantize_model(
    model: nn.Module,
    scheme: QuantScheme,
    targets: list[str] | tuple[str, ...] | None = None,
    ignore: list[str] | tuple[str, ...] | None = None,
    layer_schemes: list[tuple[str, QuantScheme]] | None = None,
    ratios: dict[str, Tensor] | None = None,
) -> QuantReport:
    """Replace matching ``nn.Linear`` modules in place by ``QATLinear`` (sharing their weights).
    ``ratios``: the clip ratios of the MSE search, run beforehand (``qat.policy.search``); a
    layer missing from it starts at ratio 1 (min-max). None: each layer searches its own.

    Raises ``QuantConfigError`` if a pattern matches no Linear layer, or a scheme cannot be
    applied to a layer (e.g. group size not dividing in_features; the error names the layer).
    """
    target_res = _compile(targets or DEFAULT_TARGETS, "targets")
    ignore_res = _compile(ignore or (), "ignore")
    default_ignore = _compile(DEFAULT_IGNORE, "ignore") if not targets else []
    overrides = list(layer_schemes or [])
    override_res = list(zip(_compile([p for p, _ in overrides], "layer_schemes"), [s for _, s in overrides]))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QATLinear)}
    experts = expert_tensors(model)
    if not linears and not experts:
        raise QuantConfigError("the model has no nn.Linear layers to quantize")

    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D" and any(r.search(n) for r in target_res)]
    if conv1d and not any(any(r.search(n) for r in target_res) for n in linears):
        raise QuantConfigError(
            f"targets: the transformer blocks of this model are built of transformers' Conv1D layers (GPT-2 style, e.g. {conv1d[0]}), "
            "not nn.Linear; qat quantizes nn.Linear layers only: use a model family whose projections are nn.Linear"
        )
    names = [*linears, *experts]
    for key, regs in (("targets", target_res), ("ignore", ignore_res), ("layer_schemes", [r for r, _ in override_res])):
        for r in regs:
            if not any(r.search(n) for n in names):
                raise QuantConfigError(f"{key}: pattern {r.pattern!r} matches no Linear layer or expert tensor of the model")

    report = QuantReport()
    chosen: dict[str, QuantScheme] = {}
    for name in names:
        if any(r.search(name) for r in target_res) and not any(r.search(name) for r in [*ignore_res, *default_ignore]):
            chosen[name] = next((s for r, s in override_res if r.search(name)), scheme)
        else:
            report.skipped.append(name)
    if not chosen:
        raise QuantConfigError("targets/ignore leave no Linear layer to quantize")

    for name, s in chosen.items():  # validate every layer before changing any
        if name in experts:
            check_layout(experts[name][0], name)
            check_expert_scheme(s, name, experts[name][0]._parameters[experts[name][1]].shape[-1])
        else:
            s.check_layer(name, linears[name].in_features)
    given, search = ratios or {}, ratios is None
    for name, s in chosen.items():
        if name in experts:
            module, pname = experts[name]
            report.experts[name] = wrap_expert_tensor(module, pname, s, name, given.get(name), search).num_experts
        else:
            parent, attr = _parent(model, name)
            setattr(parent, attr, QATLinear.from_linear(getattr(parent, attr), s, name, given.get(name), search))
        report.layers[name] = s
    _count_block_weights(model, report)
    return report


def _count_block_weights(model: nn.Module, report: QuantReport) -> None:
    """Fill the report's parameter counts: every matrix (2-D or more, biases aside) inside the
    blocks; those of no Linear or expert tensor (a router, say) join ``skipped``."""
    quantized = {f"{n}.weight" for n in report.layers}
    listed = {f"{n}.weight" for n in report.skipped} | set(report.skipped)
    params = [(f"{m}.{n}" if m else n, p, isinstance(mod, QATLinear) and n != "weight")
              for m, mod in model.named_modules() for n, p in mod.named_parameters(recurse=False)]
    for pname, p, qparam in params:
        if qparam or p.ndim < 2 or pname.endswith("bias") or not _in_blocks(pname):
            continue
        report.block_params += p.numel()
        if pname in quantized:
            report.quantized_block_params += p.numel()
        elif pname not in listed:
            report.skipped.append(pname.removesuffix(".weight"))


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


@contextmanager
def fake_quantized(model: nn.Module, schemes: dict[str, QuantScheme]):
    """Swap the Linear layers (and fused expert tensors) named in ``schemes`` for ``QATLinear``
    layers (those schemes, qparams initialised from the weight) for the duration of the block, and
    put the originals back afterwards. The two share their weight tensors, so what the wrapped
    layers trained stays in the originals. Yields ``{name: QATLinear}``."""
    swapped = {}
    try:
        for name, s in schemes.items():
            parent, attr = _parent(model, name)
            if attr in parent._parameters:  # a fused expert tensor
                swapped[name] = (parent, attr, None)
                wrap_expert_tensor(parent, attr, s, name)
                continue
            orig = getattr(parent, attr)
            setattr(parent, attr, QATLinear.from_linear(orig, s, name))
            swapped[name] = (parent, attr, orig)
        yield {name: getattr(parent, attr) for name, (parent, attr, _) in swapped.items()}
    finally:
        for parent, attr, orig in reversed(swapped.values()):
            if orig is None:
                unwrap_expert_tensor(parent, attr, getattr(parent, attr).weight)
            else:
                setattr(parent, attr, orig)


def planned_weight(model: nn.Module, name: str) -> Tensor:
    """The weight of a quantizable layer by its name: a Linear's (wrapped or not), or a fused
    expert tensor ``[experts, out, in]`` (a parameter, or the weight of its ``QATExpertWeight``)."""
    parent, attr = _parent(model, name)
    p = parent._parameters.get(attr)
    return p if p is not None else getattr(parent, attr).weight


def qat_linears(model: nn.Module) -> dict[str, QATLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QATLinear)}


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None, param_dtype: torch.dtype | None = None) -> dict[str, dict]:
    """Replace every ``QATLinear`` in place by a plain ``nn.Linear`` holding its on-grid weight
    (scales rounded to ``dtype`` first when given, so the weights are exactly what a kernel
    reading a ``dtype`` checkpoint computes; ``param_dtype``: the dtype the training forward saw
    the parameters in, under FSDP2 mixed precision). Returns, per layer, the layer description
    for ``qat_quant.json`` plus its stored ``(scale, zero_point)`` under ``"_qparams"``."""
    layers = {}
    for name, layer in qat_linears(model).items():
        weight, scale, zero = layer.written_weight(dtype, param_dtype)
        target_dtype = dtype or layer.weight.dtype
        parent, attr = _parent(model, name)
        if isinstance(layer, QATExpertWeight):
            unwrap_expert_tensor(parent, attr, weight)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            plain.weight = nn.Parameter(weight, requires_grad=False)
            if layer.bias is not None:
                plain.bias = nn.Parameter(layer.bias.detach().to(target_dtype), requires_grad=False)
            setattr(parent, attr, plain)
        s = layer.scheme
        layers[name] = {
            "bits": s.bits,
            "group_size": s.group_size,
            "symmetric": s.symmetric,
            "grid": s.grid,
            "frozen": layer.frozen,
            "act_bits": s.act_bits,
            **({"experts": layer.num_experts, "shape": list(layer.weight.shape)} if isinstance(layer, QATExpertWeight) else {}),
            "_qparams": (scale, zero),
        }
    return layers


def add_activation_quant(model: nn.Module, bits_by_layer: dict[str, int]) -> int:
    """Fake-quantize the inputs of the named layers of a loaded model (a ``final/``, whose
    QATLinear layers became plain Linear layers) as training did (``quant.act_bits``): a forward
    pre-hook with the same per-token function. Returns how many layers got one."""
    from .grid import fake_quantize_activation

    n = 0
    for name, bits in bits_by_layer.items():
        if bits is None:
            continue
        layer = model.get_submodule(name)
        layer.register_forward_pre_hook(lambda mod, args, b=bits: (fake_quantize_activation(args[0], b), *args[1:]))
        n += 1
    return n


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Switch fake-quant of every ``QATLinear`` on or off (off: the plain Linear forward, as before
    ``quant.start_step``); fixed and frozen layers keep their grid either way."""
    for layer in qat_linears(model).values():
        layer.quant_enabled = enabled


@torch.no_grad()
def reinit_qparams(model: nn.Module) -> int:
    """Re-initialise the qparams of every non-fixed ``QATLinear`` from its current weight, as at
    wrap time (``scheme.scale_init``: min-max, or the MSE clip search), writing into the existing
    tensors so an optimizer holding learnable scales keeps them. Returns the number of layers."""

    n = 0
    for layer in qat_linears(model).values():
        if layer.fixed:
            continue
        s = layer.scheme
        w = layer.weight.detach().float()
        if s.scale_init == "mse":
            ratio = mse_clip_ratio(w, s.bits, s.group_size, s.symmetric, seq=s.seq)
        else:
            ratio = torch.ones(group_count(layer), device=w.device)
        if s.learnable:
            scale, zero = minmax_qparams(w, s.bits, s.group_size, s.symmetric, ratio, s.seq)
            layer.weight_scale.copy_(scale)
            layer.weight_zero_point.copy_(zero)
        else:
            layer.clip_ratio.copy_(ratio)
        n += 1
    return n


def set_recompute(model: nn.Module, recompute: bool) -> None:
    """``quant.recompute`` for every QATLinear of ``model``."""
    for m in qat_linears(model).values():
        m.recompute = recompute


def set_kernel(model: nn.Module, kernel: str) -> int:
    """Choose the fake-quant implementation (``fused.KERNELS``) of every QATLinear in ``model``
    (the recipe's ``quant.kernel``); returns how many layers."""

    if kernel not in KERNELS:
        raise QuantConfigError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    layers = [m for m in model.modules() if isinstance(m, QATLinear)]
    for m in layers:
        m.kernel = kernel
    return len(layers)
