"""Local vs global: per-layer relative output error next to the global loss (arXiv 2410.14570).

For quantized variants of one base model, ``layer_output_errors`` runs the full-precision
reference on held-out inputs and, at every quantized Linear, measures

    err(layer) = ||X W^T - X W_hat^T||_F / ||X W^T||_F

with ``X`` the inputs the *reference* layer receives (the same inputs for every variant, so the
numbers are comparable across methods) and ``W_hat`` the variant's effective weight (on-grid
weight, plus ``B A`` scaled when the variant carries a LoRA correction in ``final/adapter``,
mapped back through the per-channel factors AWQ folded into it, ``final/qat/scales.safetensors``:
``diag(output_scale) W_hat diag(input_scale)^-1``, so a layer that now receives ``x / s`` is
judged on what it computes from the reference's ``x``).
Methods that lower this local error do not necessarily lower the global loss (perplexity, KL to
the teacher); ``qat compare`` prints both side by side.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ..io.final import _safetensor_files, load_quant_layers


@torch.no_grad()
def layer_output_errors(
    reference: nn.Module,
    variants: dict[str, dict[str, Tensor]],
    blocks,
    batch_size: int = 8,
    desc: str | None = "layer errors",
) -> dict[str, dict[str, float]]:
    """``{variant: {layer: ||X (W_hat - W)^T|| / ||X W^T||}}`` over ``blocks`` (rows of
    ``.input_ids`` / ``.attention_mask``), ``X`` = the reference layer's inputs (real tokens)."""
    device = next(reference.parameters()).device
    modules = dict(reference.named_modules())
    # Linear layers: a fused expert tensor has no module of its own to hook (its error is left out)
    names = sorted({n for v in variants.values() for n in v if n in modules}, key=list(modules).index)
    num = {v: {n: 0.0 for n in ws if n in modules} for v, ws in variants.items()}
    den = {n: 0.0 for n in names}
    mask_now: list[Tensor | None] = [None]
    handles = []
    for n in names:
        def hook(mod, args, _out, n=n):
            x = args[0].reshape(-1, args[0].shape[-1])
            if mask_now[0] is not None:
                x = x[mask_now[0].reshape(-1).bool()]
            x = x.float()
            w = mod.weight.float()
            den[n] += float((x @ w.T).square().sum())
            for v, ws in variants.items():
                if n in ws:
                    d = ws[n].to(device, torch.float32) - w
                    num[v][n] += float((x @ d.T).square().sum())
        handles.append(modules[n].register_forward_hook(hook))
    was_training = reference.training
    reference.eval()
    starts = range(0, len(blocks), batch_size)
    if desc:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, leave=False)
    try:
        for s in starts:
            ids = blocks.input_ids[s : s + batch_size].to(device)
            mask = blocks.attention_mask[s : s + batch_size].to(device)
            mask_now[0] = None if bool(mask.all()) else mask
            reference(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
        reference.train(was_training)
    return {v: {n: (num[v][n] / den[n]) ** 0.5 if den[n] > 0 else float("nan") for n in num[v]} for v in variants}


def bits_per_weight(final_dir: str | Path, scale_bits: int = 16) -> float | None:
    """Storage of the quantized layers per weight: codes, one ``scale_bits`` scale per group
    (plus a ``bits``-bit zero-point when asymmetric) and, when ``final/adapter`` holds a LoRA
    correction, its factors at ``scale_bits`` bits per entry."""
    from safetensors import safe_open

    final_dir = Path(final_dir)
    layers = load_quant_layers(final_dir)
    if not layers:
        return None
    shapes: dict[str, list[int]] = {}
    for f in _safetensor_files(final_dir):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if k.endswith(".weight") and k[: -len(".weight")] in layers:
                    shapes[k[: -len(".weight")]] = st.get_slice(k).get_shape()
    lora_entries: dict[str, int] = {}
    adapter = final_dir / "adapter" / "adapter_model.safetensors"
    if adapter.exists():
        with safe_open(str(adapter), "pt") as st:
            for k in st.keys():
                m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_[AB](?:\.default)?\.weight", k)
                if m:
                    shape = st.get_slice(k).get_shape()
                    lora_entries[m.group(1)] = lora_entries.get(m.group(1), 0) + shape[0] * shape[1]
    total_bits, total_weights = 0.0, 0
    for n, info in layers.items():
        *lead, in_f = info.get("shape") or shapes[n]  # a fused expert tensor: [experts, out, in]
        out_f = math.prod(lead)
        groups = out_f * (in_f // (info["group_size"] or in_f))
        total_bits += info["bits"] * out_f * in_f + groups * (scale_bits + (0 if info["symmetric"] or info.get("grid") == "seq" else info["bits"]))
        total_bits += scale_bits * lora_entries.get(n, 0)
        total_weights += out_f * in_f
    return total_bits / total_weights


def mean_error(errors: dict[str, float]) -> float:
    vals = [e for e in errors.values() if e == e]
    return sum(vals) / len(vals) if vals else float("nan")


def local_vs_global_inversions(rows: list[dict]) -> list[tuple[str, str]]:
    """Pairs ``(a, b)`` where ``a`` has the lower mean layer error but the higher KL to the
    teacher (or, without KL, the higher perplexity) than ``b``."""
    out = []
    key = "kl_to_teacher" if all(r.get("kl_to_teacher") is not None for r in rows) else "ppl"
    for a in rows:
        for b in rows:
            ea, eb = a.get("mean_layer_error"), b.get("mean_layer_error")
            if ea is None or eb is None or a is b:
                continue
            if ea < eb and a[key] > b[key]:
                out.append((a["method"], b["method"]))
    return out
