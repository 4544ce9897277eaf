"""What both analyses start from: a recipe's pretrained model (fp32, eval mode), its quantization
plan, calibration blocks (the first blocks the QAT run would visit) and held-out validation blocks.

Also the two pieces of machinery they share: temporarily fake-quantizing a chosen subset of the
plan's layers (``quantized``), and the calibration backprops (``squared_grads``).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..data.plans import calibration_blocks, heldout_blocks
from ..data.setup import load_plan_and_data
from ..evaluate.perplexity import perplexity
from ..io.final import final_dtype
from ..io.models import load_student
from ..quant.apply import fake_quantized, planned_weight
from ..quant.scheme import QuantScheme
from ..recipe import Recipe, RecipeError

BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)\.")


@dataclass
class Setup:
    model: nn.Module
    plan: dict[str, QuantScheme]  # layer name -> scheme (the recipe's targets/ignore/overrides)
    calib: object  # TokenBlocks
    valid: object  # TokenBlocks (held-out; the calibration blocks when the recipe has no validation split)
    valid_what: str
    device: torch.device
    save_dtype: str  # what final/ and the export would be written in (qat.final.final_dtype)


def layer_type(name: str) -> str:
    """``model.layers.3.self_attn.v_proj`` -> ``v_proj`` (the last name component)."""
    return name.rsplit(".", 1)[-1]


def layer_depth(name: str) -> int:
    """The decoder block index of a layer name (-1 outside the blocks)."""
    m = BLOCK_INDEX.search(name)
    return int(m.group(1)) if m else -1


def exact_pattern(name: str) -> str:
    """An anchored regex matching exactly this layer name."""
    return "^" + re.escape(name) + "$"


def load_setup(recipe: Recipe, calib_sequences: int, valid_tokens: int, device: str | None = None) -> Setup:
    """Load the recipe's model, plan and data (recipe problems raise ``RecipeError``)."""
    from pathlib import Path

    if recipe.quant is None:
        raise RecipeError("quant: the analysis needs a quant section (the scheme to quantize to)")
    if recipe.model.path is None:
        raise RecipeError("model.path: the analysis needs a pretrained model; this recipe builds one from scratch")

    _, config, plan, train_set, valid_set = load_plan_and_data(recipe, Path(recipe.output_dir))
    save_dtype = final_dtype(recipe, config)
    calib = calibration_blocks(train_set, calib_sequences * train_set.seq_len, recipe.train.seed)
    if valid_set is not None:
        valid, what = heldout_blocks(valid_set, valid_tokens), "validation split"
    else:
        valid, what = calib, "calibration blocks (the recipe has no validation split)"
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_student(recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": "float32"})}), config)
    model.to(dev).eval()
    return Setup(model, plan, calib, valid, what, dev, save_dtype)


@contextmanager
def quantized(model: nn.Module, plan: dict[str, QuantScheme], names):
    """Fake-quantize exactly the layers ``names`` (with their plan schemes, min-max qparams
    recomputed from the weight, STE gradients) for the duration of the block; the original
    ``nn.Linear`` modules (sharing the same weight tensors) are put back afterwards."""
    with fake_quantized(model, {n: plan[n] for n in names}):
        yield model


def causal_lm_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens (the model's own loss with labels)."""
    return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


def squared_grads(model: nn.Module, names: list[str], blocks, batch_size: int, keep_grads: bool = False) -> dict:
    """Calibration backprops: for every micro-batch k of ``blocks``, the gradient ``g_k`` of the
    mean next-token cross-entropy w.r.t. each named layer's weight.

    Returns ``{"sq": {name: mean_k mean_ij g_k[i,j]^2}, "grads": {name: mean_k g_k}, "loss":
    mean_k L_k, "batches": K}``; ``mean_k g_k`` (the gradient of the calibration loss, fp32, on the
    CPU) only with ``keep_grads``."""
    device = next(model.parameters()).device
    params = {n: planned_weight(model, n) for n in names}
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    sq = {n: 0.0 for n in names}
    mean = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()} if keep_grads else {}
    loss_sum, k = 0.0, 0
    try:
        for s in range(0, len(blocks), batch_size):
            ids = blocks.input_ids[s : s + batch_size].to(device)
            mask = blocks.attention_mask[s : s + batch_size].to(device)
            with torch.set_grad_enabled(bool(params)):
                loss = causal_lm_loss(model, ids, mask)
            grads = torch.autograd.grad(loss, list(params.values())) if params else ()
            for n, g in zip(params, grads):
                g = g.detach().float()
                sq[n] += float(g.square().mean())
                if keep_grads:
                    mean[n] += g.cpu()
            loss_sum += float(loss.detach())
            k += 1
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
    return {"sq": {n: v / k for n, v in sq.items()}, "grads": {n: g / k for n, g in mean.items()}, "loss": loss_sum / k, "batches": k}


@torch.no_grad()
def mean_nll(model: nn.Module, blocks, batch_size: int) -> float:
    """Mean next-token NLL over the real tokens of ``blocks`` (token-weighted)."""

    return perplexity(model, blocks, batch_size)["nll"]
