"""The fused fake-quant (qat.quant.fused) against the eager reference: bit for bit.

Eager = ``QATLinear.fake_quantized_weight()`` (``minmax_qparams`` + ``fake_quantize_ste``), the
reference and CPU default. Fused = one autograd function running ``torch.compile`` of the same
grid functions. Forward values, the weight gradient and the LSQ scale / zero-point gradients must
be identical (``torch.equal``), in float32, in bf16 master weights, and under bf16 autocast.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

from qat.quant import QATLinear, QuantScheme, fused, quantize_model
from qat.quant.apply import set_recompute

SCHEMES = {
    "w4g32sym": QuantScheme(bits=4, group_size=32),
    "w3g16asym_mse": QuantScheme(bits=3, group_size=16, symmetric=False, scale_init="mse"),
    "w2chan_sym": QuantScheme(bits=2, group_size=None),
    "w4g32sym_lsq": QuantScheme(bits=4, group_size=32, learnable=True),
    "w4g16asym_lsq": QuantScheme(bits=4, group_size=16, symmetric=False, learnable=True),
    "w2g16seq_mse": QuantScheme(bits=2, group_size=16, symmetric=False, scale_init="mse", grid="seq"),
    "w2g16seq_lsq": QuantScheme(bits=2, group_size=16, symmetric=False, learnable=True, grid="seq"),
}
PRECISIONS = ("fp32", "bf16-weights", "bf16-autocast")


@pytest.fixture(autouse=True)
def _restore_kernel():
    before = fused.get_kernel()
    yield
    fused.set_kernel(before)


def _layer(scheme: QuantScheme, precision: str, fixed: bool = False, device: str = "cpu") -> QATLinear:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, 64))  # uneven column ranges: some groups clip
    if precision == "bf16-weights":
        lin = lin.to(torch.bfloat16)
    layer = QATLinear.from_linear(lin.to(device), scheme)
    if fixed:  # PTQ's mode: given qparams, the weight still trains; then nudge it off the grid
        layer.set_qparams(*(t.detach() for t in layer.qparams()))
        with torch.no_grad():
            layer.weight.add_(0.01 * torch.randn_like(layer.weight))
    return layer


def _step(layer: QATLinear, kernel: str, precision: str, device: str = "cpu"):
    """One forward + backward; returns the output and every gradient."""
    fused.set_kernel(kernel)
    layer.zero_grad(set_to_none=True)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).to(device)
    if precision == "bf16-weights":
        x = x.to(torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1], device=device)).pow(2).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


def _assert_identical(a, b):
    (ya, ga), (yb, gb) = a, b
    assert ya.dtype == yb.dtype and torch.equal(ya, yb)
    assert ga.keys() == gb.keys() and "weight" in ga
    for name in ga:
        assert ga[name].dtype == gb[name].dtype, name
        assert torch.equal(ga[name], gb[name]), f"{name}: max diff {(ga[name] - gb[name]).abs().max()}"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", list(SCHEMES))
def test_fused_function_matches_eager(name, precision):
    """The autograd functions of fused.py (without compile: the logic) equal the eager path."""
    layer = _layer(SCHEMES[name], precision)
    ref = _step(layer, "eager", precision)
    out = layer.fused_fake_quantized_weight  # called by forward when the kernel is "compile"
    layer.fused_fake_quantized_weight = lambda dt: out(dt, compiled=False)
    _assert_identical(ref, _step(layer, "compile", precision))
    if name.endswith("lsq"):
        assert "weight_scale" in ref[1]


@pytest.mark.parametrize(
    "name,precision,fixed",
    [
        ("w4g32sym", "fp32", False),
        ("w4g32sym", "bf16-autocast", False),
        ("w3g16asym_mse", "bf16-weights", False),
        ("w4g16asym_lsq", "bf16-autocast", False),
        ("w4g32sym", "fp32", True),
        ("w2g16seq_mse", "fp32", False),
    ],
)
def test_compiled_matches_eager_cpu(name, precision, fixed):
    """torch.compile (inductor, C++ on CPU) of the grid functions: bit for bit the eager values."""
    layer = _layer(SCHEMES[name], precision, fixed)
    _assert_identical(_step(layer, "eager", precision), _step(layer, "compile", precision))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (inductor's Triton kernels)")
@pytest.mark.parametrize("name", ["w4g32sym", "w3g16asym_mse", "w4g16asym_lsq", "w2g16seq_mse"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_compiled_matches_eager_cuda(name, precision):
    layer = _layer(SCHEMES[name], precision, device="cuda")
    _assert_identical(_step(layer, "eager", precision, "cuda"), _step(layer, "auto", precision, "cuda"))


def test_whole_model_step_identical():
    """A 2-block Llama, W4 g32 dynamic, bf16 autocast: loss and every gradient equal."""
    base = make_tiny_llama()
    quantize_model(base, QuantScheme(bits=4, group_size=32))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    results = {}
    for kernel in ("eager", "compile"):
        fused.set_kernel(kernel)
        model = copy.deepcopy(base).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[kernel] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (la, ga), (lb, gb) = results["eager"], results["compile"]
    assert torch.equal(la, lb) and torch.isfinite(la)
    assert all(torch.equal(ga[n], gb[n]) for n in ga)


def _saved_bytes(layer: nn.Module, kernel: str, autocast: bool) -> int:
    """Bytes the autograd graph keeps for backward besides the parameters' own tensors."""
    fused.set_kernel(kernel)
    x = torch.randn(4, 64, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    total = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        layer(x)
    return sum(total)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kernel", ["eager", "compile"])
@pytest.mark.parametrize("scheme", ["w4g32sym", "w4g32sym_lsq"])
def test_a_qat_layer_saves_for_backward_no_more_than_a_linear(scheme, kernel, autocast):
    """The fake-quantized weight, its STE mask and LSQ terms are recomputed in backward: a QAT
    layer keeps its input, as nn.Linear does, and nothing weight-sized (nn.Linear under autocast
    also keeps the bf16 copy of its weight)."""
    layer = _layer(SCHEMES[scheme], "fp32")
    plain = nn.Linear(64, 48)
    x_bytes = 4 * 64 * (2 if autocast else 4)
    assert _saved_bytes(layer, kernel, autocast) == x_bytes
    assert _saved_bytes(plain, kernel, autocast) == x_bytes + (2 * plain.weight.numel() if autocast else 0)
    layer.recompute = False  # quant.recompute: false keeps the quantized weight (and more) instead
    assert _saved_bytes(layer, kernel, autocast) >= x_bytes + 2 * layer.weight.numel()


@pytest.mark.parametrize("learnable", [False, True])
def test_recomputing_the_weight_in_backward_gives_the_same_gradients(learnable):
    """quant.recompute on and off: the same loss and every gradient bit for bit (bf16 autocast)."""
    base = make_tiny_llama()
    quantize_model(base, QuantScheme(bits=4, group_size=32, learnable=learnable))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    fused.set_kernel("eager")
    results = []
    for recompute in (True, False):
        model = copy.deepcopy(base).train()
        set_recompute(model, recompute)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = results
    assert torch.equal(la, lb) and ga.keys() == gb.keys() and len(ga) > 0
    assert all(torch.equal(ga[n], gb[n]) for n in ga)


def test_kernel_choice():
    with pytest.raises(ValueError, match="quant.kernel must be one of"):
        fused.set_kernel("triton")
    fused.set_kernel("auto")
    assert fused.use_fused(torch.device("cuda")) and not fused.use_fused(torch.device("cpu"))
    fused.set_kernel("compile")
    assert fused.use_fused(torch.device("cpu"))
    fused.set_kernel("eager")
    assert not fused.use_fused(torch.device("cuda"))


def test_forward_dtype_never_double_rounds():
    w32, w16 = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float16)
    assert fused.forward_dtype(w32, "cpu") == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.forward_dtype(w32, "cpu") == torch.bfloat16  # what autocast casts it to
        assert fused.forward_dtype(w16, "cpu") == torch.float16  # eager keeps fp16, then autocast casts
