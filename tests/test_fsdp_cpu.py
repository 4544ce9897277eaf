"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on a CPU gloo mesh with qat's fake-quant layers.

(`tests/test_fsdp_train.py` runs `qat train` itself sharded through `accelerate launch`; this file
checks the sharding of the layers in detail.) This drives torch's FSDP2 directly,
the way Accelerate 1.15's ``fsdp_version: 2`` wraps a model (``fsdp2_prepare_model``): every decoder
layer, the embedding, ``[final norm, lm_head]`` and then the root are ``fully_shard``-ed, student
and teacher alike. Two processes train a tiny Llama wrapped by
``quantize_model`` (W4 g32) + ov-freeze for a few KD steps; one process trains an identical,
unsharded copy on the same global batches. Checked:

- the parameters really are sharded (DTensor, ``Shard(0)``), but every fake-quant forward sees the
  full, all-gathered weight (a plain tensor of the full shape);
- the gathered full state dict equals the unsharded run: ov-frozen layers (and their fixed
  scales) bit-identical, first-step loss within 1e-6, later losses within 1e-3 relative, every
  other tensor within 2 * lr * steps absolute and >= 99% of the integer codes identical (the
  runs sum the same gradients in a different order: reduce-scatter across ranks vs one backward);
- the sharded model's outputs equal those of an unsharded model loaded with the gathered state;
- the global gradient norm, as qat's loop reads it (``qat.train.loop._as_float`` of a DTensor), equals
  the unsharded one (first step within 1e-5 relative).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

WORLD, STEPS, LR, GROUP = 2, 3, 1e-3, 32
BATCH, SEQ = 4, 32  # global batch: each rank takes BATCH // WORLD rows


def build(seed: int = 0, quantized: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qat.quant import QuantScheme, apply_freeze, quantize_model

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=128, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    if quantized:
        quantize_model(model, QuantScheme(bits=4, group_size=GROUP))
        apply_freeze(model, "ov-freeze")
    else:
        model.eval().requires_grad_(False)
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (BATCH, SEQ), generator=g) for _ in range(STEPS)], torch.randint(0, 256, (2, SEQ), generator=g)


def train_steps(student, teacher, rows_of):
    """KD steps as qat's loop takes them (loss, backward, global grad norm, AdamW step); returns
    the per-step losses and gradient norms."""
    from qat.distill import kd_loss
    from qat.train.loop import _as_float

    data, _ = batches()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    losses, norms = [], []
    student.train()
    for ids in data:
        ids = rows_of(ids)
        labels = ids.clone()
        logits = student(input_ids=ids).logits
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        loss = kd_loss(logits, t_logits, labels)
        loss.backward()
        norms.append(_as_float(torch.nn.utils.clip_grad_norm_(params, float("inf"))))  # a DTensor when sharded
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses, norms


def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    from qat.quant.linear import QATLinear

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        student, teacher = build(), build(seed=1, quantized=False)
        for model in (student, teacher):  # as Accelerate 1.15's FSDP2: decoder layers, embedding, [norm, lm_head], root
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model.model.embed_tokens, mesh=mesh)
            fully_shard([model.model.norm, model.lm_head], mesh=mesh, reshard_after_forward=False)
            fully_shard(model, mesh=mesh)
        q = student.model.layers[0].self_attn.q_proj
        sharded = isinstance(q.weight, DTensor) and q.weight.placements == (Shard(0),) and q.weight.to_local().shape[0] == q.out_features // WORLD

        seen = []  # what each fake-quant layer's forward sees as its weight
        for name, m in student.named_modules():
            if isinstance(m, QATLinear):
                m.register_forward_pre_hook(lambda mod, args, name=name: seen.append(
                    (name, type(mod.weight).__name__, tuple(mod.weight.shape), (mod.out_features, mod.in_features))))

        per = BATCH // WORLD
        losses, norms = train_steps(student, teacher, lambda ids: ids[rank * per : (rank + 1) * per])
        losses = torch.stack(losses)
        dist.all_reduce(losses)
        losses /= WORLD

        _, probe = batches()
        student.eval()
        with torch.no_grad():
            probe_logits = student(input_ids=probe).logits
        full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"state": full, "losses": losses, "norms": norms, "probe": probe_logits, "seen": seen, "sharded": sharded}, out)
        # both ranks leave together: a rank that tears gloo down while the other is still writing can
        # abort the other ("terminate called without an active exception", SIGABRT; seen 1 run in ~30)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fully_shard_student_and_teacher_matches_unsharded(tmp_path):
    import torch.multiprocessing as mp

    from qat.quant.grid import quantize
    from qat.quant.linear import QATLinear

    out = tmp_path / "fsdp.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    got = torch.load(out, weights_only=False)  # written by this test a moment ago

    # the reference: one process, no sharding, the same global batches
    torch.set_num_threads(1)
    ref, teacher = build(), build(seed=1, quantized=False)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_losses, ref_norms = train_steps(ref, teacher, lambda ids: ids)
    ref_losses = torch.stack(ref_losses)

    assert got["sharded"], "fully_shard did not shard q_proj's weight along dim 0"
    layers = {n: m for n, m in ref.named_modules() if isinstance(m, QATLinear)}
    assert {n for n, *_ in got["seen"]} == set(layers)
    for name, kind, shape, full in got["seen"]:  # fake-quant ran on the gathered, full weight
        assert kind in ("Parameter", "Tensor") and shape == full, (name, kind, shape, full)

    assert got["losses"][0].item() == pytest.approx(ref_losses[0].item(), rel=1e-6)
    assert torch.allclose(got["losses"], ref_losses, rtol=1e-3, atol=0), (got["losses"], ref_losses)
    # the global gradient norm qat's loop logs (and its NaN guard reads) is the unsharded one
    assert all(isinstance(n, float) for n in got["norms"])
    assert got["norms"][0] == pytest.approx(ref_norms[0], rel=1e-5)
    assert got["norms"] == pytest.approx(ref_norms, rel=1e-2)

    state, ref_state = got["state"], ref.state_dict()
    assert state.keys() == ref_state.keys()
    frozen = [n for n, m in layers.items() if m.frozen]
    assert len(frozen) == 4  # v_proj, o_proj of 2 layers
    for key, want in ref_state.items():
        have = state[key]
        name = key.rsplit(".", 1)[0]
        if name in frozen:  # frozen: weight and fixed qparams bit-identical, and unchanged since the start
            assert torch.equal(have, want) and torch.equal(have, start[key]), key
        elif name in layers and key.endswith(".weight"):
            s = layers[name].scheme
            ca = quantize(have, *_qparams(have, s), s.bits, s.symmetric, s.group_size)
            cb = quantize(want, *_qparams(want, s), s.bits, s.symmetric, s.group_size)
            assert (ca == cb).float().mean() >= 0.99, key
            assert (have - want).abs().max() <= 2 * LR * STEPS, key
        else:
            assert (have - want).abs().max() <= 2 * LR * STEPS, key

    # the sharded forward = an unsharded model holding the gathered weights
    copy = build()
    copy.load_state_dict(state)
    copy.eval()
    _, probe = batches()
    with torch.no_grad():
        want = copy(input_ids=probe).logits
    assert torch.allclose(got["probe"], want, atol=1e-5, rtol=0), (got["probe"] - want).abs().max()


def _qparams(w, s):
    from qat.quant.grid import minmax_qparams

    return minmax_qparams(w, s.bits, s.group_size, s.symmetric)
