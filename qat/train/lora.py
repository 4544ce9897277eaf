"""LoRA-QAT: low-rank adapters on the fake-quant student (recipe section ``peft:``).

Two variants:

- ``peft.mode: separate`` (QLoRA style): every quantized layer is frozen at its quantized value
  (``QATLinear.freeze``), and PEFT's ``get_peft_model`` adds full-precision LoRA adapters *outside*
  the quantizer: ``y = x Q(W)^T + s x A^T B^T`` with ``s = alpha / r``. ``final/`` holds the
  quantized base and ``final/adapter/`` the PEFT adapter (the layout of the PTQ QERA path, so
  ``qat eval`` applies it and ``qat export`` keeps it separate, or merges it with ``--merge-lora``).
  Initialisation (``peft.init``): ``gaussian`` (PEFT's default: A Kaiming-uniform, B = 0),
  ``loftq`` (alternating: base = Q(W - BA), BA = SVD_r(W - base); the base is re-quantized from
  W - BA), ``qera`` (BA = QERA-exact's output-error-optimal rank-r correction of W - Q(W), with
  R = E[x^T x] from the training data, reusing ``qat.ptq.qera.lowrank_factors``).
- ``peft.mode: merged``: each targeted ``QATLinear`` becomes a ``LoRAQATLinear`` whose quantizer
  sees ``W + s B A`` (W frozen, A and B trained through the STE), so the trained model *is*
  quantized. ``merge_lora_`` folds ``s B A`` into W (the same float expression the forward
  computes), so ``save_final`` re-quantizes it onto exactly the grid point the training forward
  used: ``final/`` reproduces the trained logits.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from ..data.plans import calibration_blocks
from ..deps import require
from ..io.final import ADAPTER_DIR, save_final
from ..quant.apply import _parent, qat_linears
from ..quant.experts import QATExpertWeight
from ..quant.grid import fake_quantize, fake_quantize_ste, minmax_qparams
from ..quant.linear import QATLinear
from ..quant.lowrank import lowrank_factors
from ..recipe import RecipeError


# -- variant (b): the quantizer sees W + s B A ------------------------------------------------
class LoRAQATLinear(QATLinear):
    """A ``QATLinear`` whose fake-quant input is ``W + scaling * B @ A``; W frozen, A and B trained."""

    @classmethod
    def from_qat(cls, layer: QATLinear, r: int, alpha: float) -> "LoRAQATLinear":
        layer.__class__ = cls
        layer.lora_r, layer.lora_scaling = r, alpha / r
        w = layer.weight
        layer.lora_A = nn.Parameter(torch.empty(r, layer.in_features, dtype=w.dtype, device=w.device))
        layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))  # PEFT's default ("gaussian": B = 0)
        w.requires_grad_(False)
        return layer

    def merged_weight(self) -> Tensor:
        return self.weight + self.lora_scaling * (self.lora_B @ self.lora_A)

    def qparams(self) -> tuple[Tensor, Tensor]:
        s = self.scheme
        if self.fixed or s.learnable:
            return super().qparams()
        w = self.merged_weight().detach()
        if w.dtype in (torch.float16, torch.bfloat16):
            w = w.float()
        return minmax_qparams(w, s.bits, s.group_size, s.symmetric, self.clip_ratio, s.seq)

    def fake_quantized_weight(self) -> Tensor:
        s = self.scheme
        scale, zero = self.qparams()
        return fake_quantize_ste(self.merged_weight(), scale, zero, s.bits, s.symmetric, s.group_size).to(self.weight.dtype)

    @torch.no_grad()
    def merge_(self) -> QATLinear:
        """Fold the adapter into W (the forward's exact expression) and become a plain QATLinear."""
        self.weight.data.copy_(self.merged_weight())
        del self.lora_A, self.lora_B
        self.__class__ = QATLinear
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora r={self.lora_r} scaling={self.lora_scaling:g} (merged-weight QAT)"


def merge_lora_(model: nn.Module) -> int:
    """Merge every ``LoRAQATLinear`` in place; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, LoRAQATLinear)]
    for m in layers:
        m.merge_()
    return len(layers)


# -- which layers --------------------------------------------------------------------------
def lora_targets(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Quantized, non-frozen layers matching ``patterns`` (``re.search``; default: all)."""

    # fused MoE expert tensors take no adapter (peft wraps modules that compute x W^T): they stay as quantized
    layers = {n: m for n, m in qat_linears(model).items() if not m.frozen and not isinstance(m, QATExpertWeight)}
    regs = [re.compile(p) for p in patterns or []]
    for r in regs:
        if not any(r.search(n) for n in layers):
            raise RecipeError(f"peft.target_modules: pattern {r.pattern!r} matches no quantized, non-frozen layer")
    names = [n for n in layers if not regs or any(r.search(n) for r in regs)]
    if not names:
        raise RecipeError("peft.target_modules: no quantized, non-frozen layer to put an adapter on")
    return names


def _lora_config(peft_opts, names: list[str]):
    LoraConfig = require("peft", "the peft section (LoRA)").LoraConfig
    return LoraConfig(
        r=peft_opts.r,
        lora_alpha=peft_opts.alpha,
        lora_dropout=peft_opts.dropout,
        target_modules=sorted(names),
        bias="none",
        init_lora_weights=True,
    )


# -- building the student --------------------------------------------------------------------
def apply_lora(model: nn.Module, recipe, calib=None, init: bool = True) -> nn.Module:
    """Add the recipe's adapters to the fake-quant ``model``; returns the model to train (a
    ``PeftModel`` for ``separate``). ``calib``: token blocks for ``init: qera``. ``init=False``: only
    the structure (the fresh copy ``final/`` is built on takes its values from the trained state)."""
    p = recipe.peft
    if p is None:
        return model
    names = lora_targets(model, p.target_modules)
    if p.mode == "merged":
        model.requires_grad_(False)
        for n in names:
            parent, attr = _parent(model, n)
            setattr(parent, attr, LoRAQATLinear.from_qat(getattr(parent, attr), p.r, p.alpha))
        return model
    from peft import get_peft_model

    how = p.init if init else "gaussian"
    if how == "qera" and calib is None:
        raise ValueError("apply_lora: init 'qera' needs calibration blocks")
    stats = second_moments(model, names, calib) if how == "qera" else {}
    starts = {n: init_base(model.get_submodule(n), how, p, stats.get(n)) for n in names}
    peft_model = get_peft_model(model, _lora_config(p, names))
    inner = peft_model.base_model.model
    with torch.no_grad():
        for n, ab in starts.items():
            if ab is None:
                continue
            a, b = ab
            mod = inner.get_submodule(n)
            la, lb = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            la.copy_(a.to(la.dtype))
            lb.copy_((b / mod.scaling["default"]).to(lb.dtype))
    return peft_model


@torch.no_grad()
def init_base(layer: QATLinear, how: str, p, r_mat: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """Freeze ``layer`` at its quantized base and return the adapter's start ``(A, B)`` with
    ``B A`` = the correction (None for gaussian: PEFT initialises it)."""

    s = layer.scheme
    w = layer.weight.detach().double()
    if how == "gaussian":
        layer.freeze()
        return None
    if how == "qera":
        layer.freeze()  # base = Q(W) on the layer's own grid (min-max / its clip ratio)
        err = w - layer.weight.detach().double()
        a, b, _ = lowrank_factors(err, p.r, r=r_mat)
        return a.float(), b.float()
    # loftq: alternate base = Q(W - BA) and BA = SVD_r(W - base)
    ratio = getattr(layer, "clip_ratio", None)
    ab = torch.zeros_like(w)
    for _ in range(p.loftq_iters):
        target = (w - ab).float()
        scale, zero = minmax_qparams(target, s.bits, s.group_size, s.symmetric, ratio, s.seq)
        base = fake_quantize(target, scale, zero, s.bits, s.symmetric, s.group_size)
        a, b, _ = lowrank_factors(w - base.double(), p.r)
        ab = b @ a
    layer.set_qparams(scale.to(layer.weight.dtype), zero.to(layer.weight.dtype), weight=target.to(layer.weight.dtype))
    layer.freeze()
    return a.float(), b.float()


@torch.no_grad()
def second_moments(model: nn.Module, names: list[str], calib, batch_size: int = 8) -> dict[str, Tensor]:
    """``R = E[x^T x]`` (float64) of each named layer's input over ``calib`` (the FP weights: the
    layers still run their dynamic fake-quant, as the student starts)."""
    sums = {n: None for n in names}
    count = {"n": 0}
    hooks = []
    for n in names:
        def hook(mod, args, _n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[_n] = x.T @ x if sums[_n] is None else sums[_n] + x.T @ x
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(calib), batch_size):
            ids = calib.input_ids[i : i + batch_size].to(device)
            mask = calib.attention_mask[i : i + batch_size].to(device)
            model(input_ids=ids, attention_mask=mask)
            count["n"] += int(ids.numel())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {n: s / count["n"] for n, s in sums.items()}


def init_calibration(recipe, train_set):
    """The first ``peft.init_tokens`` tokens of the run's epoch-0 order (for ``init: qera``)."""
    if recipe.peft is None or recipe.peft.init != "qera":
        return None

    return calibration_blocks(train_set, recipe.peft.init_tokens, recipe.train.seed)


# -- final/ --------------------------------------------------------------------------------
def save_lora_final(model: nn.Module, tokenizer, out_dir, dtype: torch.dtype, param_dtype: torch.dtype | None = None) -> None:
    """``final/`` of a (possibly LoRA) student: merged mode merges and re-quantizes; separate mode
    saves the adapter to ``final/adapter/`` and the quantized base to ``final/``."""
    from pathlib import Path

    out_dir = Path(out_dir)
    if hasattr(model, "peft_config"):  # separate: a PeftModel
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir / ADAPTER_DIR))
        model = model.unload()
    else:
        merge_lora_(model)
    save_final(model, tokenizer, out_dir, dtype, param_dtype)
