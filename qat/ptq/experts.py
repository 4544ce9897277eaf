"""PTQ on fused MoE experts: each expert calibrated on the tokens the model routes to it.

While a block is calibrated, its experts module is replaced by ``ExpertsAsLinears``: the same
routing contract (``forward(hidden_states, top_k_index, top_k_weights)``), the same gate and
activation (the module's own ``_apply_gate`` / ``act_fn``), but every expert of every fused
tensor is an ``nn.Linear`` (``...experts.gate_up_proj.3``) called on the tokens routed to it. The
PTQ methods see ordinary Linear layers with their own inputs, so GPTQ's Hessian, AWQ's clipping
statistics and Block-AP's reconstruction are per expert, on the teacher's routing. Afterwards
the per-expert results are stacked back into the fused tensor (a fixed ``QATExpertWeight``),
and the view is removed. ``ExpertsAsLinears`` computes the experts' output as the eager loop of
transformers does; ``check_view`` compares the two on the block's first calibration batch.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..quant.apply import _parent
from ..quant.experts import wrap_expert_tensor
from ..quant.linear import QATLinear
from ..quant.scheme import QuantScheme
from .install import install_quantized
from .rtn import rtn_qparams


FUSED_PROJ = ("gate_up_proj", "up_proj", "down_proj")  # the fused tensors of transformers' experts modules


class ExpertLinear(nn.Linear):
    """One expert's matrix of a fused tensor; ``tokens``: the rows of the block's flattened
    hidden states it is being called on (for the calibration runner's padding mask)."""

    tokens: Tensor | None = None


class ExpertsAsLinears(nn.Module):
    """An experts module seen as one ``nn.Linear`` per expert and fused tensor (see module doc)."""

    def __init__(self, experts: nn.Module, fused: list[str]):
        super().__init__()
        object.__setattr__(self, "orig", experts)  # not a submodule: its parameters are not this module's
        self.fused = fused
        self.num_experts = experts.num_experts
        self.counts = torch.zeros(self.num_experts, dtype=torch.long)
        for pname in fused:
            w = experts._parameters[pname]
            lins = []
            for e in range(self.num_experts):
                lin = ExpertLinear(w.shape[2], w.shape[1], bias=False, device="meta")
                lin.weight = nn.Parameter(w.detach()[e].clone(), requires_grad=False)
                lins.append(lin)
            self.add_module(pname, nn.ModuleList(lins))

    def _project(self, pname: str, e: int, x: Tensor) -> Tensor:
        if pname in self.fused:
            return self._modules[pname][e](x)
        return nn.functional.linear(x, getattr(self.orig, pname)[e])

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        o = self.orig
        out = torch.zeros_like(hidden_states)
        up = "gate_up_proj" if getattr(o, "has_gate", True) else "up_proj"
        for e in range(self.num_experts):
            tok, pos = torch.where(top_k_index == e)
            self.counts[e] += tok.numel()
            if tok.numel() == 0:
                continue
            for pname in self.fused:
                for lin in self._modules[pname]:
                    lin.tokens = tok
            x = hidden_states[tok]
            h = self._project(up, e, x)
            if getattr(o, "has_bias", False):
                h = h + getattr(o, f"{up}_bias")[e]
            h = o._apply_gate(h) if getattr(o, "has_gate", True) else o.act_fn(h)
            y = self._project("down_proj", e, h)
            if getattr(o, "has_bias", False):
                y = y + o.down_proj_bias[e]
            if getattr(o, "has_post_expert_norm", False):
                y = o.post_expert_norm(y)
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def fused_names(model: nn.Module, names) -> list[str]:
    """The names among ``names`` that are fused expert parameters (3-D) of ``model``."""
    out = []
    for n in names:
        try:
            parent, attr = _parent(model, n)
        except AttributeError:  # a per-expert name (``...gate_up_proj.3``) while no view is installed
            continue
        p = parent._parameters.get(attr)
        if p is not None and p.ndim == 3:
            out.append(n)
    return out


def per_expert_plan(model: nn.Module, plan: dict[str, QuantScheme]) -> dict[str, QuantScheme]:
    """``plan`` with every fused expert tensor replaced by its per-expert Linear names."""
    out = {}
    fused = set(fused_names(model, plan))
    for n, s in plan.items():
        if n in fused:
            parent, attr = _parent(model, n)
            out.update({f"{n}.{e}": s for e in range(parent._parameters[attr].shape[0])})
        else:
            out[n] = s
    return out


@contextmanager
def experts_as_linears(model: nn.Module, fused: list[str], plan: dict[str, QuantScheme]):
    """Replace the experts modules holding ``fused`` tensors by ``ExpertsAsLinears`` views for the
    duration; on exit stack the per-expert results back into the fused tensors (fixed
    ``QATExpertWeight``s with their qparams, ``ptq_latent`` when every expert has one) and put
    the experts modules back. ``plan``: per expert, as ``per_expert_plan`` writes it. Yields
    ``{experts module name: view}``."""
    by_module: dict[str, list[str]] = {}
    for n in fused:
        mod, _, pname = n.rpartition(".")
        by_module.setdefault(mod, []).append(pname)
    views = {}
    try:
        for mod, pnames in by_module.items():
            parent, attr = _parent(model, mod)
            views[mod] = ExpertsAsLinears(getattr(parent, attr), pnames)
            setattr(parent, attr, views[mod])
        yield views
        for mod, view in views.items():
            for pname in view.fused:
                _stack_back(view, pname, plan[f"{mod}.{pname}.0"], f"{mod}.{pname}")
    finally:
        for mod, view in views.items():
            parent, attr = _parent(model, mod)
            setattr(parent, attr, view.orig)


@torch.no_grad()
def _stack_back(view: ExpertsAsLinears, pname: str, scheme: QuantScheme, name: str) -> None:
    lins = list(view._modules[pname])
    if not all(isinstance(m, QATLinear) and m.fixed for m in lins):
        raise RuntimeError(f"{name}: {sum(not isinstance(m, QATLinear) for m in lins)} experts were not quantized")
    experts = view.orig
    weight = experts._parameters[pname]
    weight.copy_(torch.stack([m.weight.detach() for m in lins]).to(weight))
    scale = torch.stack([m.weight_scale for m in lins])
    zero = torch.stack([m.weight_zero_point for m in lins])
    q = wrap_expert_tensor(experts, pname, scheme, name)
    q.set_qparams(scale, zero)
    latents = [getattr(m, "ptq_latent", None) for m in lins]
    if all(t is not None for t in latents):
        q.ptq_latent = torch.stack(latents)


@torch.no_grad()
def check_view(view: ExpertsAsLinears, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> float:
    """Max abs difference between the view's output and the experts module's own forward."""
    ref = view.orig(hidden, top_k_index, top_k_weights)
    counts = view.counts.clone()
    got = view(hidden, top_k_index, top_k_weights)
    view.counts.copy_(counts)
    return (got.float() - ref.float()).abs().max().item()


def sequential_passes(groups: list[list[str]]) -> list[list[list[str]]]:
    """GPTQ's true-sequential passes: each group of Linear layers sharing an input on its own,
    except the experts of one fused tensor, which share a pass (all of ``gate_up_proj``'s
    experts, then all of ``down_proj``'s, each on the already-quantized ones before it)."""
    passes: list[list[list[str]]] = []
    fused_pass: dict[str, list[list[str]]] = {}
    for g in groups:
        parent, _, last = g[0].rpartition(".")
        if len(g) == 1 and last.isdigit() and parent.rpartition(".")[2] in FUSED_PROJ:
            if parent not in fused_pass:
                fused_pass[parent] = []
                passes.append(fused_pass[parent])
            fused_pass[parent].append(g)
        else:
            passes.append([g])
    return passes


@torch.no_grad()
def route_experts(runner, views: dict, names: list[str], plan, min_tokens: int, tokens: dict | None) -> list[str]:
    """One pass of the block (``runner``: its ``calibrate.BlockRunner``) with its experts as
    Linear views: check the views compute what the experts module does, count the (real) tokens
    routed to each expert, quantize the experts under ``min_tokens`` with RTN. Returns the names
    left for the method."""
    seen: dict[str, tuple] = {}
    real = {mod: torch.zeros(v.num_experts, dtype=torch.long) for mod, v in views.items()}
    hooks = []
    for mod, view in views.items():
        def first(_m, args, mod=mod):
            seen.setdefault(mod, tuple(a.detach() for a in args))
            idx = args[1] if runner._mask is None else args[1][runner._mask.reshape(-1).bool()]
            real[mod] += torch.bincount(idx.reshape(-1).cpu(), minlength=views[mod].num_experts)[: views[mod].num_experts]
        hooks.append(view.register_forward_pre_hook(first))
    try:
        runner.run()
    finally:
        for h in hooks:
            h.remove()
    for mod, view in views.items():
        if mod in seen:
            d = check_view(view, *seen[mod])
            scale = max(1.0, seen[mod][0].abs().max().item())
            if d > 1e-4 * scale:
                raise RuntimeError(f"{mod}: the per-expert view computes other outputs than the experts module (max abs difference {d:.3g})")
        for pname in view.fused:
            fused = f"{mod}.{pname}"
            counts = real[mod].tolist()
            if tokens is not None:
                tokens[fused] = counts
            for e, c in enumerate(counts):
                if c < min_tokens:
                    n = f"{fused}.{e}"
                    scale, zero = rtn_qparams(runner.module(n).weight.detach().float(), plan[n])
                    install_quantized(runner.model, n, plan[n], scale, zero)
            names += [f"{fused}.{e}" for e, c in enumerate(counts) if c >= min_tokens]
    return names
