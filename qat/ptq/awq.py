"""AWQ (Lin et al., 2023, arXiv 2306.00978): activation-aware per-channel scaling + weight clipping.

Per decoder block, on its calibration inputs (the outputs of the already-quantized blocks):

1. one full-precision pass collects, for every Linear input, ``mean |x|`` per channel and the
   per-group second moments ``E[x_g^T x_g]`` over *all* calibration tokens, and, for the first
   ``search_tokens`` tokens, the inputs and outputs of each "inspected" module;
2. scale search, per scale group (Llama: ``input_layernorm -> q,k,v`` judged on ``self_attn``'s
   output; ``v_proj -> o_proj`` when their shapes allow (no GQA); ``post_attention_layernorm ->
   gate,up`` judged on ``mlp``; ``up_proj -> down_proj``; OPT: the same with its names): for
   ``alpha`` in ``0, 1/grid, ..., (grid-1)/grid``, ``s = mean|x|^alpha`` (normalised by
   ``sqrt(max s * min s)``), the group's weights become ``Q(W diag(s)) diag(s)^-1`` with the
   scheme's grid and the inspected module's output error decides; ``alpha = 0`` is plain RTN;
3. the chosen ``s`` is folded exactly: ``W <- W diag(s)`` and the preceding op's output is divided
   by ``s`` (RMSNorm / LayerNorm weight and bias, or the preceding Linear's rows). A group whose
   preceding op cannot absorb the scale (checked numerically, e.g. Gemma's ``1 + w`` norms) is
   left unscaled;
4. clipping search (not for q/k, as in the reference, since their error is seen through the
   softmax): per (row, group) the clip ratio in ``[clip_min, 1]`` (by default the range of the
   ``mse`` scale init: from 0.5, or from 0.3 on SEQ's grid) minimising the group's share of
   the output error ``d^T E[x_g^T x_g] d`` (``d`` = weight error, inputs divided by ``s``);
5. final qparams: ``minmax_qparams(W diag(s), clip_ratio)``, installed with ``set_qparams``.

Everything stays on the scheme's grid; the folded norms are ordinary weights of ``final/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..quant.grid import clip_search, fake_quantize, minmax_qparams
from ..quant.scheme import QuantScheme
from .calibrate import BlockRunner, InputStats, first_output, to_device
from .install import install_quantized

# (preceding op, layers it feeds, module whose output judges the scale), relative to the block
_CANDIDATES = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
    ("final_layer_norm", ("fc1",), "fc1"),
    ("fc1", ("fc2",), "fc2"),
)
NO_CLIP = ("q_proj", "k_proj", "query", "key", "qkv")


@dataclass
class ScaleGroup:
    prev: str  # full module names
    layers: list[str]
    inspect: str


def _get(block: nn.Module, name: str):
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


@torch.no_grad()
def _norm_folds(norm: nn.Module, width: int) -> bool:
    """Does dividing the norm's weight (and bias) by ``s`` divide its output by ``s``?"""
    w = getattr(norm, "weight", None)
    if not isinstance(w, Tensor) or w.shape != (width,):
        return False
    b = getattr(norm, "bias", None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, width, generator=g).to(w)
    s = (torch.rand(width, generator=g) + 0.5).to(w)
    ref = norm(x)
    w0, b0 = w.data.clone(), None if b is None else b.data.clone()
    w.data.div_(s)
    if b is not None:
        b.data.div_(s)
    try:
        out = norm(x)
    finally:
        w.data.copy_(w0)
        if b is not None:
            b.data.copy_(b0)
    return torch.allclose(out, ref / s, rtol=1e-3, atol=1e-5)


def scale_groups(block: nn.Module, prefix: str, names: list[str]) -> list[ScaleGroup]:
    """The scale groups this block's architecture allows (see module doc)."""
    planned = set(names)
    out, used = [], set()
    for prev, layers, inspect in _CANDIDATES:
        mods = [_get(block, n) for n in layers]
        p, ins = _get(block, prev), _get(block, inspect)
        full = [f"{prefix}.{n}" for n in layers]
        if p is None or ins is None or any(m is None for m in mods) or not all(f in planned for f in full):
            continue
        if any(f in used for f in full):
            continue
        width = mods[0].in_features
        if any(m.in_features != width for m in mods):
            continue
        if isinstance(p, nn.Linear):
            if p.out_features != width:
                continue  # e.g. grouped-query attention: v_proj is narrower than o_proj's input
        elif not _norm_folds(p, width):
            continue
        out.append(ScaleGroup(f"{prefix}.{prev}", full, f"{prefix}.{inspect}"))
        used.update(full)
    return out


@torch.no_grad()
def scaled_fake_quant(w: Tensor, s: Tensor, scheme: QuantScheme) -> Tensor:
    """``Q(W diag(s)) diag(s)^-1`` with min-max qparams (float32)."""
    ws = w.float() * s
    scale, zero = minmax_qparams(ws, scheme.bits, scheme.group_size, scheme.symmetric, seq=scheme.seq)
    return fake_quantize(ws, scale, zero, scheme.bits, scheme.symmetric, scheme.group_size) / s


@torch.no_grad()
def search_clip(w: Tensor, block_moment: Tensor, scheme: QuantScheme, grid: int = 20, min_ratio: float = 0.5, chunk: int = 1024) -> Tensor:
    """Per (row, group) clip ratio minimising ``d_g^T E[x_g^T x_g] d_g``, ``d = w - Q_r(w)``."""
    w = w.float()
    out_f, in_f = w.shape
    gs = block_moment.shape[-1]
    best_err = torch.full((out_f, in_f // gs), float("inf"), device=w.device)
    best = torch.ones_like(best_err)
    for i in range(grid):
        r = 1.0 - (1.0 - min_ratio) * i / grid
        scale, zero = minmax_qparams(w, scheme.bits, scheme.group_size, scheme.symmetric, clip_ratio=r, seq=scheme.seq)
        d = w - fake_quantize(w, scale, zero, scheme.bits, scheme.symmetric, scheme.group_size)
        err = torch.empty_like(best_err)
        for o in range(0, out_f, chunk):
            dg = d[o : o + chunk].reshape(-1, in_f // gs, gs).transpose(0, 1)  # [G, oc, gs]
            err[o : o + chunk] = (torch.bmm(dg, block_moment) * dg).sum(-1).T
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


def awq_block(runner: BlockRunner, names: list[str], plan: dict[str, QuantScheme], opts) -> tuple[dict, dict]:
    """AWQ for the block's layers ``names`` (see module doc). Returns ``(alphas, folds)``: the
    chosen alpha per scale group, and per layer the factors folded into it
    (``{"input_scale": s}``: columns multiplied by ``s``; ``{"output_scale": s}``: rows divided by
    ``s``), with which ``qat.io.final.effective_weights`` maps the layer back to the original
    input/output space."""
    groups = scale_groups(runner.block, runner.name, names)
    stats, captured = _collect(runner, names, plan, groups, opts)
    scales, alphas = _search_scales(runner, plan, groups, stats, captured, opts)
    del captured
    scaled_inputs, folds = _fold(runner, scales)
    _clip_and_install(runner, names, plan, stats, scaled_inputs, opts)
    return alphas, folds


def _collect(runner: BlockRunner, names: list[str], plan: dict[str, QuantScheme], groups, opts):
    """1. Input statistics of the layers over all calibration tokens, and the inputs / outputs of
    the inspected modules on the first ``opts.search_tokens`` tokens (for the scale search)."""
    n_search, tokens = 0, 0
    for inp in runner.inputs:
        if tokens >= opts.search_tokens:
            break
        n_search += 1
        tokens += int(inp.mask.sum()) if inp.mask is not None else inp.hidden.shape[0] * inp.hidden.shape[1]
    captured = {g.inspect: [] for g in groups}
    handles = []
    for ins in captured:
        def pre(_m, args, kwargs, ins=ins):
            captured[ins].append([to_device(args, runner.store_device), to_device(kwargs, runner.store_device), None])

        def post(_m, _args, _kwargs, out, ins=ins):
            captured[ins][-1][2] = first_output(out).detach().to(runner.store_device)
        mod = runner.module(ins)
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    share = runner.linear_groups(names)

    def make(n):
        layer = runner.module(n)
        g = plan[n].group_size or layer.in_features
        return InputStats(layer.in_features, runner.device, abs_sum=True, block=g)
    try:
        stats = runner.collect(share, make, stop_early=False, batches=range(n_search))
    finally:
        for h in handles:
            h.remove()
    if n_search < len(runner.inputs):  # statistics only, on the rest of the calibration set
        more = runner.collect(share, make, stop_early=True, batches=range(n_search, len(runner.inputs)))
        for grp in share:
            a, b = stats[grp[0]], more[grp[0]]
            a.n += b.n
            a.abs_sum += b.abs_sum
            a.block_xtx += b.block_xtx
    return stats, captured


def _search_scales(runner: BlockRunner, plan: dict[str, QuantScheme], groups, stats, captured, opts):
    """2. Per scale group, the alpha in ``s = mean|x|^alpha`` whose fake-quant output of the
    inspected module is closest to the full-precision one (the block stays full precision)."""
    scales, alphas = {}, {}
    for sg in tqdm(groups, desc=f"awq scales {runner.name}", leave=False, dynamic_ncols=True):
        x_mean = stats[sg.layers[0]].mean_abs().float()
        layers = [runner.module(n) for n in sg.layers]
        orig = [m.weight.data.clone() for m in layers]
        inspect = runner.module(sg.inspect)
        best = (float("inf"), 0.0, None)
        for k in range(opts.grid):
            alpha = k / opts.grid
            s = x_mean.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for n, m, w in zip(sg.layers, layers, orig):
                m.weight.data = scaled_fake_quant(w, s, plan[n]).to(w.dtype)
            err, count = 0.0, 0
            for args, kwargs, ref in captured[sg.inspect]:
                out = first_output(inspect(*to_device(args, runner.device), **to_device(kwargs, runner.device)))
                err += float((out.float() - ref.to(out.device).float()).square().sum())
                count += ref.numel()
            err /= max(count, 1)
            if err < best[0]:
                best = (err, alpha, s)
        for m, w in zip(layers, orig):
            m.weight.data = w
        scales[sg.prev] = (sg, best[2])
        alphas[sg.prev] = best[1]
    return scales, alphas


def _fold(runner: BlockRunner, scales: dict) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """3. Fold each group's scales into the preceding op and its layers (exact in full precision)."""
    scaled_inputs: dict[str, Tensor] = {}
    folds: dict[str, dict[str, Tensor]] = {}
    for prev, (sg, s) in scales.items():
        p = runner.module(prev)
        sp = s.to(p.weight)
        if isinstance(p, nn.Linear):
            p.weight.data.div_(sp.unsqueeze(1))
            folds.setdefault(prev, {})["output_scale"] = s.float().cpu()
        else:
            p.weight.data.div_(sp)
        if getattr(p, "bias", None) is not None:
            p.bias.data.div_(sp)
        for n in sg.layers:
            m = runner.module(n)
            m.weight.data.mul_(s.to(m.weight))
            scaled_inputs[n] = s
            folds.setdefault(n, {})["input_scale"] = s.float().cpu()
    return scaled_inputs, folds


def _clip_and_install(runner: BlockRunner, names: list[str], plan: dict[str, QuantScheme], stats, scaled_inputs, opts) -> None:
    """4. The clipping search on the output error, and 5. the final qparams of every layer."""
    for n in tqdm(names, desc=f"awq clip {runner.name}", leave=False, dynamic_ncols=True):
        layer = runner.module(n)
        w = layer.weight.detach().float()
        scheme = plan[n]
        ratio = None
        if opts.clip and not n.rsplit(".", 1)[-1].startswith(NO_CLIP):
            bm = stats[n].block_second_moment()
            if n in scaled_inputs:
                inv = (1.0 / scaled_inputs[n].float()).reshape(bm.shape[0], -1)
                bm = bm * inv.unsqueeze(2) * inv.unsqueeze(1)
            grid, lo = clip_search(scheme.seq)
            ratio = search_clip(w, bm, scheme, opts.clip_grid or grid, opts.clip_min or lo)
        scale, zero = minmax_qparams(w, scheme.bits, scheme.group_size, scheme.symmetric, ratio, scheme.seq)
        install_quantized(runner.model, n, scheme, scale, zero)
