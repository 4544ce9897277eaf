"""Compare two compressed-tensors checkpoints: tensor names, dtypes, shapes, scales and int codes.

Used to check qat's export against llm-compressor's on the same model and scheme. llm-compressor
pins older transformers / compressed-tensors than qat, so it lives in its own virtual environment:

    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 transformers==5.17.0
    /tmp/llmc/bin/python -c "
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    m = AutoModelForCausalLM.from_pretrained('../shared/models/llama-tiny', dtype='auto')
    oneshot(model=m, recipe=QuantizationModifier(targets='Linear', scheme='W4A16', ignore=['lm_head']))
    m.save_pretrained('/tmp/llmc-w4a16', save_compressed=True)"
    qat train recipes/tiny/w4-ovfreeze.yaml output_dir=/tmp/qat-w4g128 train.max_steps=0 quant.group_size=128
    qat export /tmp/qat-w4g128 --out /tmp/qat-w4g128-ct
    python benchmarks/ct_layout.py /tmp/llmc-w4a16 /tmp/qat-w4g128-ct
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: (str(st.get_slice(k).get_dtype()), tuple(st.get_slice(k).get_shape())) for k in st.keys()})
    return out


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (words.unsqueeze(-1) >> shifts) & (2**bits - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = p.parse_args()
    ha, hb = header(args.a), header(args.b)
    print(f"tensors: {len(ha)} vs {len(hb)}; only in a: {sorted(set(ha) - set(hb))[:5]}; only in b: {sorted(set(hb) - set(ha))[:5]}")
    diff = [(k, ha[k], hb[k]) for k in ha if k in hb and ha[k] != hb[k]]
    print(f"name/dtype/shape differences: {len(diff)} {diff[:5]}")
    ca = json.loads((args.a / "config.json").read_text())["quantization_config"]
    cb = json.loads((args.b / "config.json").read_text())["quantization_config"]
    bits = ca["config_groups"]["group_0"]["weights"]["num_bits"]
    ta, tb = {}, {}
    for f in args.a.glob("*.safetensors"):
        ta.update(load_file(str(f)))
    for f in args.b.glob("*.safetensors"):
        tb.update(load_file(str(f)))
    codes = codes_diff = scales = scales_diff = 0
    for k in ta:
        if k.endswith(".weight_packed") and k in tb:
            ua, ub = unpack(ta[k], bits), unpack(tb[k], bits)
            codes, codes_diff = codes + ua.numel(), codes_diff + (ua != ub).sum().item()
            s = k.replace("weight_packed", "weight_scale")
            scales, scales_diff = scales + ta[s].numel(), scales_diff + (ta[s] != tb[s]).sum().item()
    packed = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
    dense = [k for k in ta if k in tb and not k.endswith(packed)]
    dense_same = sum(torch.equal(ta[k], tb[k]) for k in dense)
    print(f"scales differing: {scales_diff} of {scales}; int{bits} codes differing: {codes_diff} of {codes} "
          f"({codes_diff / max(codes, 1):.2%}); dense tensors identical: {dense_same} of {len(dense)}")
    print(f"quantization_config keys only in a: {sorted(set(ca) - set(cb))}, only in b: {sorted(set(cb) - set(ca))}")


if __name__ == "__main__":
    main()
