"""--merge-lora: merge a run's adapter into the base and re-quantize the layers it touches."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..data import load_documents
from ..deps import hint
from ..io.final import ADAPTER_DIR
from ..quant.grid import minmax_qparams, quantize
from ..quant.linear import QuantizedWeight
from ..recipe import validate
from .source import ExportError, ExportSource


@torch.no_grad()
def sample_ids(src: ExportSource, n: int = 4, seq_len: int = 128) -> tuple[Tensor, str]:
    """A few validation sequences: the run's validation documents if they can be read, else a
    seeded random draw of token ids (the returned string says which)."""
    vocab = src.model.config.vocab_size
    try:
        import yaml
        from transformers import AutoTokenizer

        recipe = validate(yaml.safe_load((src.run_dir / "recipe.yaml").read_text()))
        docs = load_documents(recipe.data, "valid")
        tok = AutoTokenizer.from_pretrained(src.final_dir)
        ids: list[int] = []
        for d in docs or []:
            ids += tok(d, add_special_tokens=False)["input_ids"]
            if len(ids) >= n * seq_len:
                break
        if len(ids) >= n * seq_len:
            return torch.tensor(ids[: n * seq_len]).view(n, seq_len), f"{n} x {seq_len} validation tokens"
    except Exception:
        pass
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, seq_len), generator=g), f"{n} x {seq_len} random token ids (validation data not readable)"


@torch.no_grad()
def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids).logits.float()


@torch.no_grad()
def merge_lora(src: ExportSource, ids: Tensor) -> dict:
    """Merge ``src.adapter_dir`` into ``src.model`` and re-quantize every quantized layer (in place).
    Returns the logit change vs base + adapter (unmerged), both run in final/'s dtype."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ExportError(hint("peft", "--merge-lora")) from None
    if src.adapter_dir is None:
        raise ExportError(f"--merge-lora: {src.final_dir} has no {ADAPTER_DIR}/ (PEFT adapter) to merge")
    ref = PeftModel.from_pretrained(copy.deepcopy(src.model).to(src.dtype), str(src.adapter_dir)).eval()
    unmerged = _logits(ref, ids)
    with ref.disable_adapter():
        base = _logits(ref, ids)
    del ref
    peft_model = PeftModel.from_pretrained(src.model, str(src.adapter_dir))
    prefix = "base_model.model."
    touched = {n.removeprefix(prefix) for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    merged = peft_model.merge_and_unload().eval()
    requantized = sorted(touched & set(src.qweights))
    for name in requantized:  # layers the adapter does not touch keep their codes and qparams
        s = src.qweights[name].scheme
        lin = merged.get_submodule(name)
        w = lin.weight.detach().float()
        scale, zero = minmax_qparams(w, s.bits, s.group_size, s.symmetric, seq=s.seq)
        codes = quantize(w, scale, zero, s.bits, s.symmetric, s.group_size)
        new = QuantizedWeight(codes, scale.to(src.dtype), zero.to(src.dtype), s)
        lin.weight.data = new.dequantize(src.dtype).float()
        src.qweights[name] = new
    src.model = merged
    after = _logits(copy.deepcopy(merged).to(src.dtype), ids)
    diff = (after - unmerged).abs()
    return {
        "max_abs_logit_change": diff.max().item(),
        "mean_abs_logit_change": diff.mean().item(),
        "adapter_effect_max_abs": (unmerged - base).abs().max().item(),
        "adapter_effect_mean_abs": (unmerged - base).abs().mean().item(),
        "tokens": int(ids.numel()),
        "requantized_layers": len(requantized),
        "adapter_layers_left_in_full_precision": sorted(touched - set(src.qweights)),
    }
