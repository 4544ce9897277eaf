"""The shared layer-by-layer calibration runner of every PTQ method.

The model is processed one decoder block at a time, the way GPTQ processes it:

1. ``capture_inputs`` runs the calibration sequences through the model until the first block and
   keeps what that block receives (hidden states and the keyword arguments the model passes it:
   position embeddings, attention mask, ...);
2. for block ``i``, a ``BlockRunner`` replays those inputs through the block. The method asks it
   for statistics of the inputs of some of the block's Linear layers (``collect``: forward hooks
   that stream ``X^T X``, ``mean |x|``, ... into ``InputStats``, so nothing token-sized is kept),
   quantizes those layers (``install.install_quantized``: a ``QATLinear`` whose qparams are fixed with
   ``set_qparams``), and may ask again for the layers after them (GPTQ's "true sequential" order:
   ``linear_groups`` gives the Linear layers that share one input, in the order they are called);
3. the quantized block is run on the same inputs; its outputs are the inputs of block ``i + 1``.
   So block ``i`` is always calibrated on what the already-quantized blocks ``< i`` produce.

Memory is bounded by one block plus the hidden states of the calibration set: with ``device`` a
GPU and a model that does not fit on it, the model stays on the CPU and each block is moved to the
GPU only while it is processed (``offload``); the hidden states are kept on ``store_device``.
Layers still waiting for their turn are plain ``nn.Linear`` (full precision).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.scheme import QuantConfigError, QuantScheme
from .experts import experts_as_linears, fused_names, route_experts

BLOCK_LIST_RE = re.compile(r"(^|\.)(layers|h|blocks|block)$")
_DROP_KWARGS = ("past_key_values", "past_key_value", "layer_past", "use_cache", "output_attentions", "cache_position")


class _Stop(Exception):
    """Raised from a hook to end a forward early (nothing after that point is needed)."""


def to_device(obj, device):
    """Move tensors inside nested tuples / lists / dicts to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of decoder blocks: the longest ``ModuleList`` named ``layers`` / ``h`` / ``blocks``."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and BLOCK_LIST_RE.search(name):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise QuantConfigError("PTQ: found no stack of decoder blocks (a ModuleList named layers, h or blocks)")
    return best


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@contextmanager
def on_device(module: nn.Module, device: torch.device):
    """Keep ``module`` on ``device`` for the duration (and move it back afterwards)."""
    tensors = list(module.parameters()) + list(module.buffers())
    home = tensors[0].device if tensors else torch.device(device)
    if home == torch.device(device):
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextmanager
def outside_blocks_on(model: nn.Module, prefix: str, device: torch.device):
    """Move the parameters and buffers that are *not* inside the block stack (embeddings, rotary
    tables, final norm, head) to ``device`` for the duration."""
    moved = []
    for mod_name, mod in model.named_modules():
        if mod_name == prefix or mod_name.startswith(prefix + "."):
            continue
        for kind in ("_parameters", "_buffers"):
            store = getattr(mod, kind)
            for k, t in store.items():
                if t is not None and t.device != torch.device(device):
                    moved.append((store, k, t.device))
                    if kind == "_parameters":
                        t.data = t.data.to(device)
                    else:
                        store[k] = t.to(device)
    try:
        yield
    finally:
        for store, k, home in moved:
            t = store[k]
            if isinstance(t, nn.Parameter):
                t.data = t.data.to(home)
            else:
                store[k] = t.to(home)


@dataclass
class BlockInput:
    """What one decoder block receives for one calibration batch."""

    hidden: Tensor  # [B, T, hidden], on the store device
    args: tuple  # extra positional arguments (rare)
    kwargs: dict  # position embeddings, attention mask, position ids, ...
    mask: Tensor | None  # [B, T] 1 = real token (None: all real)


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    calib,
    batch_size: int,
    device: torch.device,
    store_device: torch.device,
) -> list[BlockInput]:
    """Run ``calib`` (``.input_ids`` / ``.attention_mask`` rows) up to the first decoder block."""
    prefix, blocks = find_blocks(model)
    captured: list[BlockInput] = []
    current_mask: list[Tensor | None] = [None]

    def hook(_mod, args, kwargs):
        if args:
            hidden, extra = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, extra = kwargs.pop("hidden_states"), ()
        kw = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
        captured.append(BlockInput(hidden.detach().to(store_device), to_device(extra, store_device), to_device(kw, store_device), current_mask[0]))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with outside_blocks_on(model, prefix, device), on_device(blocks[0], device):
            for start in range(0, len(calib), batch_size):
                ids = calib.input_ids[start : start + batch_size].to(device)
                mask = calib.attention_mask[start : start + batch_size]
                current_mask[0] = None if bool(mask.all()) else mask.to(store_device)
                try:
                    model(input_ids=ids, attention_mask=mask.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


# -- input statistics ----------------------------------------------------------------------
class InputStats:
    """Streaming statistics of a Linear layer's inputs, one row per real token.

    - ``xtx``: ``sum x^T x`` in the given dtype (GPTQ: float32, QERA-exact: float64);
    - ``abs_sum``: ``sum |x|`` per channel (AWQ's activation scale);
    - ``sq_sum``: ``sum x^2`` per channel, float64 (QERA-approx: the diagonal of ``R``);
    - ``block``: per group of ``block`` consecutive channels, ``sum x_g^T x_g`` (AWQ's clipping
      search: the output error of each (row, group) of the weight).
    """

    def __init__(
        self,
        in_features: int,
        device,
        xtx: torch.dtype | None = None,
        abs_sum: bool = False,
        sq_sum: bool = False,
        block: int | None = None,
    ):
        self.in_features, self.n = in_features, 0
        self.xtx = torch.zeros(in_features, in_features, dtype=xtx, device=device) if xtx is not None else None
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64, device=device) if abs_sum else None
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device) if sq_sum else None
        self.block = block
        self.block_xtx = None
        if block is not None:
            self.block_xtx = torch.zeros(in_features // block, block, block, dtype=torch.float32, device=device)

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, self.in_features)
        if x.shape[0] == 0:
            return
        self.n += x.shape[0]
        xf = x.float()
        if self.xtx is not None:
            xd = x.to(self.xtx.dtype)
            self.xtx.addmm_(xd.T, xd)
        if self.abs_sum is not None:
            self.abs_sum += xf.abs().sum(0).double()
        if self.sq_sum is not None:
            self.sq_sum += x.double().square().sum(0)
        if self.block_xtx is not None:
            xg = xf.reshape(xf.shape[0], -1, self.block).transpose(0, 1)  # [G, n, b]
            self.block_xtx += torch.bmm(xg.transpose(1, 2), xg)

    def _check(self):
        if self.n == 0:
            raise RuntimeError("no calibration tokens reached this layer")

    def hessian(self) -> Tensor:
        """GPTQ's ``H = 2 X X^T / N`` (float32)."""
        self._check()
        return (self.xtx * (2.0 / self.n)).float()

    def second_moment(self) -> Tensor:
        """``R = E[x^T x]`` (in the dtype ``xtx`` was accumulated in)."""
        self._check()
        return self.xtx / self.n

    def mean_abs(self) -> Tensor:
        self._check()
        return self.abs_sum / self.n

    def mean_sq(self) -> Tensor:
        self._check()
        if self.sq_sum is not None:
            return self.sq_sum / self.n
        return torch.diagonal(self.xtx).double() / self.n

    def block_second_moment(self) -> Tensor:
        self._check()
        return self.block_xtx / self.n


# -- one block ----------------------------------------------------------------------------
class BlockRunner:
    """Replays a block's calibration inputs; collects Linear input statistics with hooks."""

    def __init__(self, model: nn.Module, block: nn.Module, name: str, inputs: list[BlockInput], device, store_device):
        self.model, self.block, self.name, self.inputs = model, block, name, inputs
        self.device, self.store_device = torch.device(device), torch.device(store_device)
        self._mask: Tensor | None = None

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def call(self, inp: BlockInput) -> Tensor:
        self._mask = None if inp.mask is None else inp.mask.to(self.device)
        out = self.block(inp.hidden.to(self.device), *to_device(inp.args, self.device), **to_device(inp.kwargs, self.device))
        return first_output(out)

    def rows(self, x: Tensor, layer: nn.Module | None = None) -> Tensor:
        """The rows of a layer input that belong to real tokens (an expert's input holds the
        rows ``layer.tokens`` of the block's tokens: those routed to it)."""
        x = x.reshape(-1, x.shape[-1])
        if self._mask is None:
            return x
        mask = self._mask.reshape(-1).bool()
        tokens = getattr(layer, "tokens", None)
        return x[mask if tokens is None else mask[tokens]]

    @torch.no_grad()
    def run(self, batches: Iterable[int] | None = None, stop_after: str | None = None) -> None:
        """Forward the batches (all by default), ending each early after ``stop_after`` is called."""
        handle = None
        if stop_after is not None:
            def stop(_m, _i, _o):
                raise _Stop
            handle = self.module(stop_after).register_forward_hook(stop)
        try:
            for b in range(len(self.inputs)) if batches is None else batches:
                try:
                    self.call(self.inputs[b])
                except _Stop:
                    pass
        finally:
            if handle is not None:
                handle.remove()

    @torch.no_grad()
    def linear_groups(self, names: list[str]) -> list[list[str]]:
        """``names`` grouped by shared input tensor, in call order (q/k/v, o, gate/up, down).

        Inputs are compared by identity while a reference to each is held, so a freed tensor
        whose memory is reused for a later input cannot make two groups look like one."""
        order: list[tuple[str, Tensor]] = []
        handles = []
        for n in names:
            def rec(_m, args, n=n):
                order.append((n, args[0]))
            handles.append(self.module(n).register_forward_pre_hook(rec))
        try:
            self.run([0])
        finally:
            for h in handles:
                h.remove()
        groups: list[list[str]] = []
        last = None
        seen = set()
        for n, x in order:
            if n in seen:
                continue  # a layer called twice: keep its first call
            seen.add(n)
            if groups and x is last:
                groups[-1].append(n)
            else:
                groups.append([n])
            last = x
        del order
        missing = [n for n in names if n not in seen]
        if missing:
            groups.append(missing)  # never called on the calibration data: still quantized (data-free)
        return groups

    @torch.no_grad()
    def collect(
        self,
        groups: list[list[str]],
        make_stats: Callable[[str], InputStats],
        stop_early: bool = True,
        batches: Iterable[int] | None = None,
    ) -> dict[str, InputStats]:
        """One pass over the calibration inputs; each group (layers sharing one input) gets one
        ``InputStats`` (made by ``make_stats(first_name)``), returned under every name of the group.
        With ``stop_early`` the forward ends after the last of these layers."""
        stats: dict[str, InputStats] = {}
        handles = []
        for group in groups:
            s = make_stats(group[0])
            for n in group:
                stats[n] = s

            def add(_m, args, s=s):
                s.add(self.rows(args[0], _m))
            handles.append(self.module(group[0]).register_forward_pre_hook(add))
        last = groups[-1][-1] if stop_early and groups else None
        try:
            self.run(batches, stop_after=last)
        finally:
            for h in handles:
                h.remove()
        return stats

    @torch.no_grad()
    def outputs(self) -> list[BlockInput]:
        """The (now quantized) block's outputs: the next block's inputs."""
        return [
            BlockInput(self.call(inp).to(self.store_device), inp.args, inp.kwargs, inp.mask) for inp in self.inputs
        ]


# -- installing results --------------------------------------------------------------------
def attach_lowrank(layer: nn.Module, a: Tensor, b: Tensor):
    """Add ``x A^T B^T`` to the layer's output (a LoRA term) with a forward hook; returns the handle."""
    a = a.to(layer.weight.device, layer.weight.dtype)
    b = b.to(layer.weight.device, layer.weight.dtype)

    def hook(_m, args, out):
        return out + F.linear(F.linear(args[0], a), b)

    return layer.register_forward_hook(hook)


def quantize_layerwise(
    model: nn.Module,
    plan: dict[str, QuantScheme],
    calib,
    block_fn: Callable[[BlockRunner, list[str]], None],
    batch_size: int,
    device,
    store_device,
    desc: str = "ptq",
    expert_min_tokens: int = 16,
    expert_tokens: dict[str, list[int]] | None = None,
) -> list[str]:
    """Drive ``block_fn(runner, layer_names)`` over the decoder blocks in order (see module doc).
    Fused expert tensors in ``plan`` are calibrated expert by expert (``qat/ptq/experts.py``):
    ``block_fn`` gets their per-expert Linear names (``plan`` holds those too, see
    ``per_expert_plan``); an expert routed fewer than ``expert_min_tokens`` calibration tokens
    is quantized with RTN instead; the tokens each expert saw go into ``expert_tokens``.
    Returns the planned layers that are outside the block stack (the caller quantizes those
    data-free)."""
    from tqdm.auto import tqdm

    prefix, blocks = find_blocks(model)
    per_block: dict[int, list[str]] = {}
    outside = []
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    fused = set(fused_names(model, {n.rpartition(".")[0] for n in plan}))  # plan names their experts: "<fused>.<e>"
    for n in plan:
        m = pat.match(n)
        parent = n.rpartition(".")[0]
        if parent in fused:  # an expert: calibrated through its experts module's view
            if m and parent not in per_block.setdefault(int(m.group(1)), []):
                per_block[int(m.group(1))].append(parent)
        elif m:
            per_block.setdefault(int(m.group(1)), []).append(n)
        else:
            outside.append(n)
    inputs = capture_inputs(model, calib, batch_size, device, store_device)
    for i, block in enumerate(tqdm(blocks, desc=f"{desc} blocks", dynamic_ncols=True)):
        names = per_block.get(i, [])
        block_fused = [n for n in names if n in fused]
        with on_device(block, device):
            runner = BlockRunner(model, block, f"{prefix}.{i}", inputs, device, store_device)
            with experts_as_linears(model, block_fused, plan) as views:
                names = [n for n in names if n not in fused]
                if views:
                    names = route_experts(runner, views, names, plan, expert_min_tokens, expert_tokens)
                if names:
                    block_fn(runner, names)
            if i < len(blocks) - 1:
                inputs = runner.outputs()
        del runner
    return outside
