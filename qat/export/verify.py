"""--verify: load an export back and compare it with final/."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..deps import available
from ..io.rundir import first_line
from .merge import _logits

GPTQ_LOADER = ("optimum", "gptqmodel")  # what transformers' GPTQ loader imports (gptqmodel 7.7 wants torch >= 2.14.1)


def gptq_loader_missing() -> list[str]:
    """The packages transformers needs to load a GPTQ checkpoint that are not installed."""
    return [p for p in GPTQ_LOADER if not available(p)]


@torch.no_grad()
def verify_export(out: Path, fmt: str, final: Path, merged: bool = False) -> dict:
    """Load the export back and compare with final/: logits (compressed-tensors, fake); for GPTQ the
    unpacked tensors against final/'s weights (bit for bit) and, when optimum and gptqmodel are
    installed, the logits of transformers' own GPTQ loader (its kernels compute in their own
    precision, so that difference is reported, not required to be 0)."""
    from transformers import AutoModelForCausalLM

    if merged:
        return {"what": "skipped (a merged export differs from final/ by design)", "max_abs_diff": float("nan"), "identical": False}
    ref = AutoModelForCausalLM.from_pretrained(final).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ref.config.vocab_size, (2, 64), generator=g)
    if fmt == "gptq":
        from safetensors.torch import load_file

        state = {}
        for f in out.glob("*.safetensors"):
            state.update(load_file(str(f)))
        worst = 0.0
        for name, w in gptq_dequantize(state).items():
            worst = max(worst, (w.float() - ref.get_submodule(name).weight.float()).abs().max().item())
        res = {"what": "gptq tensors unpacked vs final/ weights", "max_abs_diff": worst, "identical": worst == 0.0}
        missing = gptq_loader_missing()
        if missing:
            res["loader"] = (f"not run: transformers loads GPTQ through optimum and gptqmodel; missing {', '.join(missing)} "
                             "(pip install optimum gptqmodel)")
        else:
            model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
            d = (_logits(model, ids) - _logits(ref, ids)).abs().max().item()
            res["loader"] = f"transformers + optimum + gptqmodel: logits vs final/ on 2 x 64 tokens, max abs difference {d:.3g}"
            res["loader_max_abs_diff"] = d
        return res
    what = "logits of the export (transformers) vs final/ on 2 x 64 tokens"
    try:
        model, report = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    except (RuntimeError, ValueError, KeyError) as e:  # e.g. a conversion that cannot stack what it found
        return {"what": what, "max_abs_diff": float("nan"), "identical": False,
                "load_problems": f"transformers could not load it: {first_line(e)}"}
    d = (_logits(model.eval(), ids) - _logits(ref, ids)).abs().max().item()
    res = {"what": what, "max_abs_diff": d, "identical": d == 0.0}
    problems = load_problems(report)
    if problems:  # a tensor transformers could not load or convert was initialised at random: never an exact export
        res.update(identical=False, load_problems=problems)
    return res


def load_problems(report: dict) -> str:
    """The entries of transformers' load report that mean a tensor did not load as written
    (missing, unexpected, mismatched: a failed conversion leaves its target missing), as one line."""
    parts = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in report.get(kind) or ())
        if keys:
            parts.append(f"{kind.replace('_keys', '')}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
    parts += [str(m) for m in report.get("error_msgs") or ()]
    return "; ".join(parts)


def gptq_dequantize(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weights ``[out, in]`` from GPTQ v1 tensors (bits from the qweight shape): the reference
    decoder, written from the layout (shifts), independent of ``pack_rows``."""
    out = {}
    for key in state:
        if not key.endswith(".qweight"):
            continue
        name = key.removesuffix(".qweight")
        qweight, qzeros, scales, g_idx = (state[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
        in_f = g_idx.numel()
        bits = qweight.shape[0] * 32 // in_f
        per = 32 // bits
        mask = 2**bits - 1
        shifts = torch.arange(per, dtype=torch.int32) * bits
        q = ((qweight.unsqueeze(1) >> shifts.view(1, per, 1)) & mask).reshape(in_f, -1)  # [in, out]
        z = ((qzeros.unsqueeze(2) >> shifts.view(1, 1, per)) & mask).reshape(qzeros.shape[0], -1) + 1  # [groups, out]
        gi = g_idx.long()
        w = (q.to(scales.dtype) - z[gi].to(scales.dtype)) * scales[gi]
        out[name] = w.T.contiguous()
    return out
