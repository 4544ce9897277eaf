"""Fused expert tensors as the per-expert checkpoint keys transformers writes and loaders read.

A model holds its experts as ``[experts, out, in]`` tensors; its checkpoints (what
``save_pretrained`` writes, what llm-compressor exports, what vLLM loads) hold one matrix per
expert and projection, e.g. ``mlp.experts.3.gate_proj.weight`` and ``...up_proj.weight`` for the
two halves of ``gate_up_proj`` (Mixtral: ``block_sparse_moe.experts.3.w1`` / ``w3``). Which key
holds which rows is transformers' conversion mapping for the model; ``checkpoint_rows`` asks it
(through ``revert_weight_conversion``, the function ``save_pretrained`` uses) with a tensor of
indices, so every family transformers knows is mapped by transformers itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..quant.linear import QuantizedWeight


class LayoutError(ValueError):
    """A fused expert tensor whose checkpoint layout qat cannot map to rows of one expert."""


@torch.no_grad()
def checkpoint_rows(model: nn.Module, name: str, shape: tuple[int, int, int]) -> dict[str, Tensor]:
    """``{per-expert module name: rows of the fused tensor seen as [experts * out, in]}`` for the
    fused tensor ``name`` of ``shape``, in the layout ``save_pretrained`` writes it."""
    from transformers.core_model_loading import revert_weight_conversion

    n_exp, n_out, n_in = shape
    probe = torch.arange(n_exp * n_out * n_in, dtype=torch.float64).reshape(shape)
    out: dict[str, Tensor] = {}
    for key, t in revert_weight_conversion(model, {name: probe}).items():
        t = t[0] if isinstance(t, list) else t
        rows = (t[:, 0] // n_in).long() if t.ndim == 2 and t.shape[1] == n_in else None
        if rows is None or not key.endswith(".weight") or not torch.equal(t, (rows[:, None] * n_in + torch.arange(n_in)).double()):
            raise LayoutError(f"{name}: transformers writes it as {key} {tuple(t.shape)}, not as [out, in] rows of one expert; "
                              "qat cannot pack that layout")
        out[key.removesuffix(".weight")] = rows
    covered = torch.cat(list(out.values())).sort().values if out else torch.empty(0)
    if not torch.equal(covered, torch.arange(n_exp * n_out)):
        raise LayoutError(f"{name}: the checkpoint keys transformers writes for it ({', '.join(list(out)[:2])} ...) do not hold "
                          "each row once; qat cannot pack it")
    return out


@torch.no_grad()
def checkpoint_names(model: nn.Module, names: list[str]) -> list[str]:
    """The names the checkpoint layout gives the modules ``names`` (Mixtral's ``mlp.gate`` is
    ``block_sparse_moe.gate`` on disk), by transformers' own renaming."""
    from transformers.core_model_loading import revert_weight_conversion

    out = revert_weight_conversion(model, {f"{n}.weight": torch.zeros(1, 1) for n in names})
    return sorted(k.removesuffix(".weight") for k in out)


def rows_of(qw: QuantizedWeight, rows: Tensor) -> QuantizedWeight:
    """The codes and qparams of ``rows`` of a fused ``[experts, out, in]`` weight, as one matrix."""
    codes, scale, zero = (t.reshape(-1, t.shape[-1])[rows] for t in (qw.codes, qw.scale, qw.zero_point))
    return QuantizedWeight(codes, scale, zero, qw.scheme)


def meta_model(final_dir: Path) -> nn.Module:
    """The model of ``final_dir``'s config on the meta device (no memory): what
    ``checkpoint_rows`` needs to find the model's conversion mapping."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(final_dir))


def drop_fused(model: nn.Module, name: str) -> None:
    """Remove the fused parameter ``name`` from ``model`` (its per-expert tensors are written apart)."""
    parent, _, attr = name.rpartition(".")
    del model.get_submodule(parent)._parameters[attr]
