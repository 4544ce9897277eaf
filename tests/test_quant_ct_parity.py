"""Parity with compressed-tensors (the format vLLM serves): same scales, same codes, same values.

qat computes qparams with ``minmax_qparams`` and codes with ``quantize``; compressed-tensors with
``calculate_qparams`` (from per-group min / max) and ``lifecycle.forward.quantize``. For
symmetric int quantization both use signed codes, so scales, codes and fake-quant values must be
bit-identical. For asymmetric quantization compressed-tensors uses signed codes and zero-points
(int4: ``[-8, 7]``), qat unsigned ones (``[0, 15]``): the codes and zero-points differ by
``2^(bits-1)`` and the dequantized values are identical.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("compressed_tensors")

from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

from qat.quant import QATLinear, QuantScheme  # noqa: E402
from qat.quant.grid import dequantize, fake_quantize, group_view, minmax_qparams, quantize  # noqa: E402

GROUPS = [32, 64, 128]


def _ct_args(bits: int, group_size: int, symmetric: bool) -> QuantizationArgs:
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size)


def _ct_qparams(w: torch.Tensor, args: QuantizationArgs):
    wg = group_view(w, args.group_size)
    return calculate_qparams(wg.amin(dim=-1), wg.amax(dim=-1), args)


def _random_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * 0.02
    heavy = torch.distributions.StudentT(3.0).sample((64, 384)) * 0.01  # heavy tails / outliers
    skewed = torch.rand(32, 256, generator=g) * 0.05 - 0.01  # mostly positive
    w_zero_group = w.clone()
    w_zero_group[5, :128] = 0.0
    return {"gauss": w, "student_t": heavy, "skewed": skewed, "zero_group": w_zero_group}


def _llama_tiny_weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    out = {k: v.float() for k, v in state.items() if k.endswith("proj.weight")}
    assert len(out) >= 7
    return out


def _check_symmetric(w: torch.Tensor, bits: int, group_size: int, name: str):
    args = _ct_args(bits, group_size, True)
    ct_scale, ct_zero = _ct_qparams(w, args)
    scale, zero = minmax_qparams(w, bits, group_size, True)
    assert scale.dtype == ct_scale.dtype == torch.float32
    assert torch.equal(scale, ct_scale), f"{name}: scales differ"
    assert (ct_zero == 0).all() and (zero == 0).all()

    ct_codes = ct_quantize(w, ct_scale, ct_zero, args)
    codes = quantize(w, scale, zero, bits, True, group_size)
    assert torch.equal(codes, ct_codes.to(torch.int32)), f"{name}: codes differ"
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1

    ct_fq = ct_fake_quantize(w, ct_scale, ct_zero, args)
    fq = fake_quantize(w, scale, zero, bits, True, group_size)
    assert torch.equal(fq, ct_fq), f"{name}: fake-quant differs"
    assert torch.equal(dequantize(codes, scale, zero, group_size), ct_dequantize(ct_codes, ct_scale, ct_zero, args))

    # and through the module: QATLinear exports exactly these codes and scales
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    qw = QATLinear.from_linear(lin, QuantScheme(bits=bits, group_size=group_size), name).quantized_weight()
    assert torch.equal(qw.scale, ct_scale) and torch.equal(qw.codes, ct_codes.to(torch.int32))


def _check_asymmetric(w: torch.Tensor, bits: int, group_size: int, name: str):
    args = _ct_args(bits, group_size, False)
    offset = 2 ** (bits - 1)
    ct_scale, ct_zero = _ct_qparams(w, args)
    scale, zero = minmax_qparams(w, bits, group_size, False)
    assert ct_zero.dtype == torch.int8
    assert torch.equal(scale, ct_scale), f"{name}: scales differ"
    ok = ~(group_view(w, group_size) == 0).all(-1)  # compressed-tensors' zero-point of an all-zero group is 0/0
    assert torch.equal((zero - offset)[ok], ct_zero.float()[ok]), f"{name}: zero-points differ"
    assert zero.min() >= 0 and zero.max() <= 2**bits - 1

    ct_codes = ct_quantize(w, ct_scale, ct_zero, args)
    codes = quantize(w, scale, zero, bits, False, group_size)
    okw = ok.unsqueeze(-1).expand(*ok.shape, group_size).reshape(w.shape)
    assert torch.equal((codes - offset)[okw], ct_codes.to(torch.int32)[okw]), f"{name}: codes differ"
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1

    deq = dequantize(codes, scale, zero, group_size)
    ct_deq = ct_dequantize(ct_codes, ct_scale, ct_zero, args)
    assert torch.equal(deq[okw], ct_deq[okw]), f"{name}: dequantized values differ"
    ct_fq = ct_fake_quantize(w, ct_scale, ct_zero, args)
    assert torch.equal(fake_quantize(w, scale, zero, bits, False, group_size)[okw], ct_fq[okw])
    assert (deq[~okw] == 0).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", GROUPS)
def test_symmetric_random(bits, group_size):
    for name, w in _random_weights().items():
        _check_symmetric(w, bits, group_size, name)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", GROUPS)
def test_asymmetric_random(bits, group_size):
    for name, w in _random_weights().items():
        _check_asymmetric(w, bits, group_size, name)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_llama_tiny_weights(llama_tiny_path, bits, symmetric):
    weights = _llama_tiny_weights(llama_tiny_path)
    check = _check_symmetric if symmetric else _check_asymmetric
    for group_size in GROUPS:
        for name, w in weights.items():
            check(w, bits, group_size, name)
