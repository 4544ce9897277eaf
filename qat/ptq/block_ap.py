"""Block-AP: block-wise training of weights and scales through the fake-quant (EfficientQAT's first
phase, Chen et al. 2024, arXiv 2407.11062), as a PTQ method and a QAT warm start.

For each decoder block, in order (``calibrate.quantize_layerwise``: block ``i`` sees what the
already-quantized blocks ``< i`` produce):

1. the target is the full-precision block's output on those inputs;
2. the block's planned Linear layers become training ``QATLinear`` layers (learnable scales from
   the scheme's ``scale_init``), and their weights and qparams are trained with AdamW to minimise
   the mean squared error between the fake-quantized block's output and the target, over the real
   tokens of the calibration set (``ptq.block_ap.epochs`` passes, cosine learning rate, the STE of
   ``grid.py``); norms and everything else in the block stay fixed;
3. each layer is installed on its trained grid (``install_quantized``); the trained latent weight is
   kept as ``ptq_latent`` (written to ``qat/latent.safetensors``), so ``quant.init_from`` this run
   starts QAT from the trained weights and scales: Block-AP, then end-to-end QAT (EfficientQAT
   trains only the scales end to end; here the recipe decides what trains).

EfficientQAT's targets come from a separate full-precision stream; here the target block sees the
same (quantized-stream) inputs as the student, so one stream of hidden states is kept, as for GPTQ.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quant.apply import fake_quantized
from ..quant.scheme import QuantScheme
from .calibrate import BlockInput, BlockRunner
from .install import install_quantized


def _floating(obj, dtype: torch.dtype):
    """Floating tensors inside nested tuples / lists / dicts cast to ``dtype``."""
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_floating(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _floating(v, dtype) for k, v in obj.items()}
    return obj


def _masked_mse(out: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return F.mse_loss(out.float(), target.float())
    keep = mask.reshape(-1).bool().to(out.device)
    return F.mse_loss(out.reshape(-1, out.shape[-1])[keep].float(), target.reshape(-1, target.shape[-1])[keep].float())


def block_ap_block(runner: BlockRunner, names: list[str], plan: dict[str, QuantScheme], opts, seed: int = 0) -> dict:
    """Train and quantize the block's layers ``names`` (see module doc); returns the block's losses."""
    from tqdm.auto import tqdm

    block, inputs = runner.block, runner.inputs
    dtype = next(block.parameters()).dtype
    block.float()  # trained in float32 (AdamW on bf16 weights loses the small steps), put back after
    runs = [BlockInput(inp.hidden, _floating(inp.args, torch.float32), _floating(inp.kwargs, torch.float32), inp.mask) for inp in inputs]
    with torch.no_grad():
        targets = [runner.call(BlockInput(inp.hidden.float(), inp.args, inp.kwargs, inp.mask)).to(runner.store_device) for inp in runs]

    frozen = [p for p in block.parameters() if p.requires_grad]  # only the planned layers' weights and qparams train
    for p in frozen:
        p.requires_grad_(False)
    # the wrapped layers share their weights with the block's Linear layers, which keep what was trained
    with fake_quantized(runner.model, {n: replace(plan[n], learnable=True) for n in names}) as layers:
        for m in layers.values():
            m.weight.requires_grad_(True)
        qparams = [p for m in layers.values() for p in (m.weight_scale, m.weight_zero_point) if p.requires_grad]
        groups = [{"params": qparams, "base_lr": opts.lr}, {"params": [m.weight for m in layers.values()], "base_lr": opts.weight_lr}]
        opt = torch.optim.AdamW([g for g in groups if g["base_lr"] > 0], lr=opts.lr, weight_decay=0.0)
        steps = opts.epochs * len(runs)
        gen = torch.Generator().manual_seed(seed)
        order = [b for _ in range(opts.epochs) for b in torch.randperm(len(runs), generator=gen).tolist()]
        losses = []
        with torch.enable_grad():
            for step, b in enumerate(tqdm(order, desc=f"block-ap {runner.name}", leave=False, dynamic_ncols=True)):
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))
                inp = runs[b]
                out = runner.call(BlockInput(inp.hidden.float(), inp.args, inp.kwargs, inp.mask))
                loss = _masked_mse(out, targets[b].to(out.device), inp.mask)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        del opt, targets
        with torch.no_grad():
            trained = {n: tuple(t.detach().float().clone() for t in (*m.qparams(), m.weight)) for n, m in layers.items()}

    for p in frozen:
        p.requires_grad_(True)
    block.to(dtype)
    with torch.no_grad():  # each layer on its trained grid
        for n, (scale, zero, latent) in trained.items():
            install_quantized(runner.model, n, plan[n], scale, zero, latent).ptq_latent = latent.cpu()
    first = sum(losses[: len(runs)]) / max(1, min(len(runs), len(losses)))
    last = sum(losses[-len(runs):]) / max(1, min(len(runs), len(losses)))
    return {runner.name: {"steps": len(losses), "mse_first_epoch": first, "mse_last_epoch": last}}
