"""The recipe's quantization policy applied to a model: which Linears are fake-quantized and how
(``quant``), which are frozen and from when (``freeze``), when fake-quant starts, where the
qparams start from (``quant.init_from``, in ``init_from.py``). The same functions check a recipe
on a weightless (meta) model before any weights load and build the real student."""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..io.models import first_line
from ..quant import QuantReport, apply_freeze, quantize_model
from ..quant.apply import reinit_qparams, set_fake_quant, set_kernel, set_recompute
from ..quant.freeze import OV_PATTERNS
from ..quant.scheme import QuantConfigError, QuantScheme
from ..recipe import Recipe, RecipeError
from .init_from import check_layers, load_quantized_start


def dry_run_quant(recipe: Recipe, config) -> None:
    """Apply quantization and freezing to a weightless (meta) copy of the model, so that bad
    patterns or group sizes fail before any weights load."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    except (ValueError, TypeError, KeyError) as e:
        raise RecipeError(f"{'model.path' if recipe.model.path else 'model.config'}: cannot build the model: {first_line(e)}") from None
    if resolve_freeze_default(recipe, model):
        fused = fused_value_layer(model)
        print("freeze.policy: null would be ov-freeze at this bit width, but the model has no o_proj / v_proj Linear layers: nothing is frozen"
              + (f"\n  ({FUSED_QKV_NOTE.format(fused)})" if fused else ""))
    try:
        report, _ = build_student_quant(model, recipe, at_step=math.inf)  # a delayed freeze policy is checked too
    except QuantConfigError as e:
        key = _quant_error_key(str(e), recipe)
        hint = ""
        if key == "freeze.policy" and recipe.freeze.policy == "ov-freeze":
            fused = fused_value_layer(model)
            hint = (f" ({FUSED_QKV_NOTE.format(fused)})" if fused else
                    " (this model has no such projections: set freeze.patterns to its value/output projections, e.g. OPT: ['\\.v_proj$', '\\.out_proj$'])")
        raise RecipeError(f"{key}: {e}{hint}") from None
    if recipe.quant is not None and recipe.quant.init_from is not None:
        check_layers(report.layers, recipe.quant.init_from)


def resolve_freeze_default(recipe: Recipe, model: nn.Module) -> bool:
    """A default (null) ``freeze.policy`` that became ov-freeze becomes none on a model without
    o_proj / v_proj (``model``: a weightless copy will do), in place, before recipe.yaml is
    written: a resume, and ``qat compare`` deciding whether a run can be reused, resolve it the
    same way. Returns whether it changed."""
    f = recipe.freeze
    if f._by_default and f.policy == "ov-freeze" and not _has_ov_layers(model):
        f.policy = "none"
        return True
    return False


FUSED_QKV = re.compile(r"\.(qkv_proj|query_key_value|Wqkv|c_attn|qkv)$")
FUSED_QKV_NOTE = (
    "its value projection is fused with q and k into one Linear, {}; freezing works on whole layers and would fix "
    "q and k too, so ov-freeze does not apply: freeze the output projections alone with freeze.policy: custom, "
    "freeze.patterns: ['\\.o_proj$'], or leave freeze.policy: none"
)


def fused_value_layer(model: nn.Module) -> str | None:
    """The first Linear that holds q, k and v in one weight (phi3's ``qkv_proj``), or None."""
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Linear) and FUSED_QKV.search(n)), None)


def _has_ov_layers(model: nn.Module) -> bool:
    """Does every ov-freeze pattern match a Linear layer of ``model``?"""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return all(any(re.search(p, n) for n in names) for p in OV_PATTERNS)


def _quant_error_key(msg: str, recipe: Recipe) -> str:
    """The recipe key a ``QuantConfigError`` from ``quantize_model`` / ``apply_freeze`` is about."""
    if msg.startswith("freeze"):
        return "freeze.patterns" if recipe.freeze.patterns else "freeze.policy"
    for prefix, key in (("targets", "quant.targets"), ("ignore", "quant.ignore"), ("layer_schemes", "quant.overrides")):
        if msg.startswith(prefix):
            return key
    layer = re.match(r"layer '([^']+)': group_size", msg)
    if layer and recipe.quant is not None:  # the first override matching the layer gave it its group size
        for i, o in enumerate(recipe.quant.overrides):
            if re.search(o.pattern, layer.group(1)):
                return f"quant.overrides.{i}.group_size" if o.group_size is not None else "quant.group_size"
        return "quant.group_size"
    return "quant"


def build_student_quant(model: nn.Module, recipe: Recipe, init: bool = False, at_step: float = 0,
                        ratios: dict[str, torch.Tensor] | None = None) -> tuple[QuantReport | None, list[str]]:
    """Wrap the Linears (and with ``init``, load ``quant.init_from``: the real student only), then
    freeze the layers whose freeze is in force at the top of step ``at_step`` (see ``freeze_due``).
    ``ratios``: the MSE clip search's results (``search.clip_ratios``; ``{}``: no search, the
    qparams are loaded next); None: each layer searches its own."""
    report = None
    if recipe.quant is not None:
        q = recipe.quant
        report = quantize_model(model, q.scheme(), q.targets, q.ignore, q.layer_schemes(), ratios)
        set_kernel(model, q.kernel)  # this model's layers only: no process-wide state
        set_recompute(model, q.recompute)
        if init and q.init_from is not None and not next(model.parameters()).is_meta:  # the structure on the meta device: broadcast later
            print(load_quantized_start(model, q.init_from))
    frozen = freeze_layers(model, recipe) if freeze_due(recipe, at_step) else []
    return report, frozen


def freeze_layers(model: nn.Module, recipe: Recipe) -> list[str]:
    f = recipe.freeze
    return apply_freeze(model, f.policy, f.patterns, scales=f.scales)


def freeze_due(recipe: Recipe, step: float) -> bool:
    """Is the freeze policy in force at the top of step ``step``? A delayed freeze
    (``freeze.start_step`` N > 0) happens at the top of step N, so it is in force from N + 1 on."""
    n = recipe.freeze.start_step
    return n == 0 or n < step


def schedule_transitions(model: nn.Module, recipe: Recipe, step: int, main: bool) -> None:
    """The in-loop schedule, at the top of step ``step``: fake-quant switched on at
    ``quant.start_step`` (qparams re-initialised from the weights trained so far), then the
    delayed freeze at ``freeze.start_step`` (layers snapped to the grid they trained under)."""
    q = recipe.quant
    if q is not None and q.start_step and step == q.start_step:
        set_fake_quant(model, True)
        n = reinit_qparams(model)
        if main:
            print(f"step {step}: fake-quant on (quant.start_step), qparams of {n} layers re-initialised from the weights")
    if recipe.freeze.start_step and step == recipe.freeze.start_step:
        frozen = freeze_layers(model, recipe)
        if main:
            print(f"step {step}: {len(frozen)} layers frozen ({recipe.freeze.policy}, freeze.start_step)")


def quant_plan(recipe: Recipe, config) -> dict[str, QuantScheme]:
    """``{layer name: scheme}`` from the recipe's quant section, resolved on a weightless model."""
    q = recipe.quant
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    try:
        report = quantize_model(model, q.scheme(), q.targets, q.ignore, q.layer_schemes())
    except QuantConfigError as e:
        raise RecipeError(f"quant: {e}") from None
    return dict(report.layers)
