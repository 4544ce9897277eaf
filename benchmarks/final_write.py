"""Time of the final/ write against a plain ``save_pretrained`` of the same model.

A random-weight Llama (``--hidden``, ``--layers``; saved to a temporary directory, as a run's
``model.path``) is quantized W4g128 with the MSE clip search (the 4-bit default) and its state is
taken as a run's trained state. Then, single process, CPU:

- ``save_pretrained``: the plain model saved (what any fine-tuning run costs), in fp32 and in bf16
  (the dtype final/ is written in here);
- ``final/ (fresh copy)``: what ``write_final`` did before: a second student read from disk with
  ``from_pretrained``, quantized again (the clip search re-run), the state loaded into it, then
  ``save_final`` (dequantize + save);
- ``final/ (meta skeleton)``: what ``write_final`` does: the structure on the meta device, the
  state assigned into it, then ``save_final``.

    python benchmarks/final_write.py --hidden 1024 --layers 12      # ~170M parameters
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qat.io.final import save_final
    from qat.quant import QuantScheme, quantize_model

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 128 * 128, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64, vocab_size=args.vocab,
                      tie_word_embeddings=False)
    scheme = QuantScheme(bits=4, group_size=128, symmetric=True, scale_init="mse")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        n = sum(p.numel() for p in model.parameters())
        t = time.perf_counter()
        model.save_pretrained(tmp / "src")
        plain = time.perf_counter() - t
        half = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
        t = time.perf_counter()
        half.save_pretrained(tmp / "src-bf16")
        plain_bf16 = time.perf_counter() - t
        del half
        quantize_model(model, scheme)
        state = model.state_dict()
        rows = [("save_pretrained (plain model, fp32)", plain), ("save_pretrained (plain model, bf16: final/'s dtype)", plain_bf16)]

        t = time.perf_counter()
        fresh = AutoModelForCausalLM.from_pretrained(tmp / "src")
        quantize_model(fresh, scheme)
        fresh.load_state_dict(state)
        save_final(fresh, None, tmp / "final-a", torch.bfloat16)
        rows.append(("final/ (fresh copy: from_pretrained + clip search)", time.perf_counter() - t))
        del fresh

        t = time.perf_counter()
        with torch.device("meta"):
            skel = AutoModelForCausalLM.from_config(cfg)
        quantize_model(skel, scheme)
        skel.load_state_dict(state, assign=True)
        save_final(skel, None, tmp / "final-b", torch.bfloat16)
        rows.append(("final/ (meta skeleton, state assigned)", time.perf_counter() - t))

        a, b = load_file(str(tmp / "final-a" / "model.safetensors")), load_file(str(tmp / "final-b" / "model.safetensors"))
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"Llama hidden {args.hidden}, {args.layers} layers: {n / 1e6:.0f}M parameters, W4g128 (mse), {torch.get_num_threads()} threads")
    print("| write | seconds | x save_pretrained fp32 | x save_pretrained bf16 |\n|---|---|---|---|")
    for what, s in rows:
        print(f"| {what} | {s:.2f} | {s / plain:.2f} | {s / plain_bf16:.2f} |")
    print(f"the two final/ identical: {same}")


if __name__ == "__main__":
    main()
