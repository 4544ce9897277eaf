"""Fused MoE experts ([experts, out, in] parameters) quantized like Linear layers, expert by expert."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qat.quant import QATLinear, QuantScheme, apply_freeze, dequantize_model, quantize_model
from qat.quant.experts import QATExpertWeight
from qat.quant.grid import fake_quantize

MOE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
           vocab_size=300, max_position_embeddings=128, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           tie_word_embeddings=False)
SCHEMES = {
    "minmax": QuantScheme(bits=4, group_size=16, symmetric=True, scale_init="minmax"),
    "mse": QuantScheme(bits=3, group_size=16, symmetric=True, scale_init="mse"),
    "lsq-seq": QuantScheme(bits=2, group_size=16, symmetric=False, scale_init="mse", learnable=True, grid="seq"),
}


def tiny_moe(impl: str = "eager", seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("qwen3_moe", **MOE)
    cfg._experts_implementation = impl
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", list(SCHEMES))
def test_an_expert_tensor_is_quantized_as_each_experts_linear(kind):
    """Values and gradients (weight, and scales under LSQ) of the fused quantizer equal those of
    one QATLinear per expert, bit for bit: one grid implementation for both."""
    s = SCHEMES[kind]
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 24, 32))
    fused = QATExpertWeight.from_param(w, s, "experts.gate_up_proj")
    linears = []
    for e in range(4):
        lin = nn.Linear(32, 24, bias=False)
        lin.weight = nn.Parameter(w.detach()[e].clone())
        linears.append(QATLinear.from_linear(lin, s, f"e{e}"))
    y = fused.forward_weight("cpu")
    g = torch.randn_like(y)
    (y * g).sum().backward()
    for e, lin in enumerate(linears):
        ye = lin.forward_weight("cpu")
        (ye * g[e]).sum().backward()
        assert torch.equal(y[e], ye)
        assert torch.equal(w.grad[e], lin.weight.grad)
        if s.learnable:
            assert torch.equal(fused.weight_scale.grad[e], lin.weight_scale.grad)
    qw = fused.quantized_weight()
    assert qw.codes.shape == (4, 24, 32) and qw.scale.shape == (4, 24, 2)
    assert torch.equal(qw.dequantize(), fused.on_grid_weight())


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_every_experts_implementation_computes_with_the_fake_quantized_experts(impl):
    """The model forward under each experts implementation equals the plain model whose fused
    tensors hold their fake-quant values; the loss reaches every expert's latent weight."""
    model = tiny_moe(impl)
    ref = copy.deepcopy(model)
    s = SCHEMES["minmax"]
    report = quantize_model(model, s)
    assert set(report.experts.values()) == {4} and len(report.experts) == 4
    for name in report.experts:
        parent, _, attr = name.rpartition(".")
        w = ref.get_submodule(parent)._parameters[attr]
        q = model.get_submodule(name)
        w.data = fake_quantize(w.detach(), *q.qparams(), s.bits, s.symmetric, s.group_size)
    for name, layer in model.named_modules():  # the Linear layers too
        if type(layer) is QATLinear:
            ref.get_submodule(name).weight.data = layer.on_grid_weight()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref(ids).logits, rtol=0, atol=1e-6)
    out.loss.backward()
    g = model.model.layers[0].mlp.experts.gate_up_proj.weight.grad
    assert g is not None and bool((g.abs().sum(dim=(1, 2)) > 0).all()), "every expert gets a gradient"


def test_the_report_counts_weights_and_warns_when_experts_are_left_out():
    model = tiny_moe()
    full = quantize_model(model, SCHEMES["minmax"])
    assert full.block_share > 0.97 and "WARNING" not in full.summary()
    assert "4 expert tensors x 4 experts" in full.summary() and "model.layers.*.mlp.gate" in full.summary()
    partial = quantize_model(tiny_moe(), SCHEMES["minmax"], ignore=[r"experts\."])
    text = partial.summary()
    assert partial.block_share < 0.5 and "WARNING" in text and "model.layers.*.mlp.experts.gate_up_proj" in text, text


def test_a_freeze_pattern_fixes_expert_tensors_on_their_grid():
    model = tiny_moe()
    s = SCHEMES["minmax"]
    quantize_model(model, s)
    frozen = apply_freeze(model, "custom", [r"experts\.down_proj$"])
    assert frozen == ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]
    q = model.get_submodule(frozen[0])
    assert q.frozen and not q.weight.requires_grad
    assert torch.equal(q.weight, fake_quantize(q.weight.detach(), q.weight_scale, q.weight_zero_point, s.bits, s.symmetric, s.group_size))


def test_dequantize_gives_back_the_experts_module_with_on_grid_weights():
    model = tiny_moe("grouped_mm")
    quantize_model(model, SCHEMES["mse"])
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
    layers = dequantize_model(model)
    experts = model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "Qwen3MoeExperts" and isinstance(experts.gate_up_proj, nn.Parameter)
    assert layers["model.layers.0.mlp.experts.gate_up_proj"]["experts"] == 4
    assert layers["model.layers.0.mlp.experts.gate_up_proj"]["shape"] == [4, 64, 64]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_the_ptq_view_computes_what_the_experts_module_does_and_counts_routed_tokens():
    from qat.ptq.experts import ExpertsAsLinears, check_view

    experts = tiny_moe().model.layers[0].mlp.experts
    view = ExpertsAsLinears(experts, ["gate_up_proj", "down_proj"])
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 64, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(40)])
    weights = torch.rand(40, 2, generator=g)
    assert check_view(view, hidden, idx, weights) < 1e-6
    view(hidden, idx, weights)
    assert view.counts.tolist() == torch.bincount(idx.reshape(-1), minlength=4).tolist()


def test_export_refuses_asymmetric_or_mixed_expert_schemes():
    from qat.export.packing import check_experts
    from qat.export.source import ExportError

    sym = {"bits": 4, "group_size": 16, "symmetric": True, "grid": "int", "experts": 4}
    check_experts({"m.experts.gate_up_proj": sym, "m.experts.down_proj": sym})
    with pytest.raises(ExportError, match="asymmetric"):
        check_experts({"m.experts.gate_up_proj": {**sym, "symmetric": False}})
    with pytest.raises(ExportError, match="different schemes"):
        check_experts({"m.experts.gate_up_proj": sym, "m.experts.down_proj": {**sym, "bits": 8}})


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("kind", ["minmax", "lsq-seq"])
def test_experts_keep_nothing_weight_sized_for_backward_and_give_the_same_gradients(impl, kind):
    """quant.recompute (default): the experts module keeps for backward no more than its inputs
    (the fake-quantized tensors are rebuilt in backward); off, it keeps them (at least the two
    fused tensors' size). Loss and every gradient are the same bit for bit either way."""
    model = tiny_moe(impl).train()
    quantize_model(model, SCHEMES[kind])
    experts = model.model.layers[0].mlp.experts
    weight_bytes = sum(q.weight.numel() * q.weight.element_size() for q in experts.modules() if isinstance(q, QATExpertWeight))
    hidden = torch.randn(24, 64, requires_grad=True)
    top = torch.topk(torch.rand(24, 4, generator=torch.Generator().manual_seed(2)), 2)
    routing = (top.indices, torch.softmax(top.values, -1).requires_grad_())

    def saved(recompute: bool) -> tuple[int, torch.Tensor]:
        for q in experts.modules():
            if isinstance(q, QATExpertWeight):
                q.recompute = recompute
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        inputs = {t.untyped_storage().data_ptr() for t in (hidden, *routing)}
        total = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in params | inputs:
                total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = experts(hidden, *routing)
        return sum(total), out

    kept, out_r = saved(True)
    kept_off, out_k = saved(False)
    assert kept == 0, kept  # only the inputs (and parameters) are held for backward
    assert kept_off >= weight_bytes, (kept_off, weight_bytes)
    assert torch.equal(out_r, out_k)

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    grads = []
    for recompute in (True, False):
        m = copy.deepcopy(model)
        for q in m.modules():
            if isinstance(q, QATLinear):
                q.recompute = recompute
        loss = m(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = grads
    assert torch.equal(la, lb) and ga.keys() == gb.keys()
    assert all(torch.equal(ga[n], gb[n]) for n in ga), [n for n in ga if not torch.equal(ga[n], gb[n])][:3]
