"""KD losses: the chunked loss equals the naive one (values and gradients), the top-k loss, and
the teacher top-k cache (precompute, resume, fingerprint, training from it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qat.distill import TopK, distill_loss, kd_loss, kd_token_loss, kd_topk_loss

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes/tiny/w4-ovfreeze.yaml")
from conftest import require_tiny  # noqa: E402


def inputs(seed=0, B=3, T=29, V=211, dtype=torch.float32):
    """Student/teacher logits and labels with padding at the end of two rows (n = 67 real tokens)."""
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    t = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 20:] = -100
    labels[2, 5:] = -100
    return s, t, labels


def loss_and_grad(s, teacher, labels, scale=1.0, **kw):
    s = s.detach().clone().requires_grad_()
    total, kd, ce = distill_loss(s, teacher, labels, **kw)
    (scale * total).backward()
    return total.detach(), None if kd is None else kd.detach(), ce.detach(), s.grad


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "cakld"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_equals_naive_fp32(loss, temperature, chunk):
    s, t, labels = inputs()
    kw = dict(loss=loss, temperature=temperature, kd_weight=0.7, ce_weight=0.3)
    naive = loss_and_grad(s, t, labels, **kw, chunk_tokens=None)
    chunked = loss_and_grad(s, t, labels, **kw, chunk_tokens=chunk)
    for a, b in zip(naive[:3], chunked[:3]):
        assert b.item() == pytest.approx(a.item(), rel=1e-6, abs=1e-7)
    assert naive[1].item() > 0.1  # a real divergence, not zeros
    torch.testing.assert_close(chunked[3], naive[3], rtol=1e-5, atol=1e-8)
    assert chunked[3][1, 20:].abs().sum() == 0 and chunked[3][:, -1].abs().sum() == 0  # padding / last position: no gradient
    assert naive[3].abs().max() > 1e-4


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_naive_bf16(loss):
    s, t, labels = inputs(seed=1, dtype=torch.bfloat16)
    kw = dict(loss=loss, temperature=1.5, kd_weight=1.0, ce_weight=0.5)
    naive = loss_and_grad(s, t, labels, **kw, chunk_tokens=None)
    chunked = loss_and_grad(s, t, labels, **kw, chunk_tokens=10)
    for a, b in zip(naive[:3], chunked[:3]):  # the losses are float32 either way
        assert b.item() == pytest.approx(a.item(), rel=1e-6)
    assert chunked[3].dtype == torch.bfloat16
    # one bf16 rounding of the same float32 gradient each, plus one of the 1/n scaling here
    torch.testing.assert_close(chunked[3].float(), naive[3].float(), rtol=2**-7, atol=naive[3].float().abs().max().item() * 2**-8)


def test_cakld_mixes_reverse_and_forward_kl_by_teacher_confidence():
    """Per token: c * RKL + (1 - c) * FKL with c the teacher's top probability; a confident
    teacher (c -> 1) gives the reverse KL, a flat one mostly the forward KL."""
    from qat.distill.losses import kd_token_loss

    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 50, generator=g, dtype=torch.float64)
    t = torch.randn(6, 50, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1, 3, 10, 30, 100.0], dtype=torch.float64)[:, None]
    c = torch.softmax(t, -1).amax(-1)
    rkl, fkl = kd_token_loss(s, t, "reverse_kl"), kd_token_loss(s, t, "forward_kl")
    ca = kd_token_loss(s, t, "cakld")
    assert torch.allclose(ca, (c * rkl + (1 - c) * fkl).float(), rtol=1e-6)
    assert c[0] < 0.1 and c[-1] > 0.99  # the rows span flat to confident teachers
    assert ca[-1].item() == pytest.approx(rkl[-1].item(), rel=1e-2)
    assert abs(ca[0] - fkl[0]) < abs(ca[0] - rkl[0])


def test_chunked_ce_only_and_scaled_backward():
    s, _, labels = inputs(seed=2)
    naive = loss_and_grad(s, None, labels, scale=0.25, ce_weight=1.0, chunk_tokens=None)
    chunked = loss_and_grad(s, None, labels, scale=0.25, ce_weight=1.0, chunk_tokens=9)
    assert naive[1] is None and chunked[1] is None
    assert chunked[0].item() == pytest.approx(naive[0].item(), rel=1e-6)
    torch.testing.assert_close(chunked[3], naive[3], rtol=1e-5, atol=1e-9)  # grad_output 0.25 applied


def test_chunked_without_grad_and_one_backward_only():
    s, t, labels = inputs(seed=3)
    with torch.no_grad():
        total, kd, ce = distill_loss(s, t, labels, chunk_tokens=16)
    assert kd.item() == pytest.approx(kd_loss(s, t, labels).item(), rel=1e-6)
    x = s.clone().requires_grad_()
    total, _, _ = distill_loss(x, t, labels, chunk_tokens=16)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        total.backward()


def test_topk_with_k_equal_vocab_is_the_full_loss():
    s, t, labels = inputs(seed=4, V=50)
    ids = t.argsort(dim=-1, descending=True)
    top = TopK(ids.to(torch.int32), t.gather(-1, ids))
    for loss in ("forward_kl", "jsd"):
        full = loss_and_grad(s, t, labels, loss=loss, temperature=2.0, chunk_tokens=None)
        topk = loss_and_grad(s, top, labels, loss=loss, temperature=2.0, chunk_tokens=None)
        assert topk[1].item() == pytest.approx(full[1].item(), rel=1e-5)
        torch.testing.assert_close(topk[3], full[3], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_topk_loss_definition_and_chunked(loss):
    """Naive top-k loss against the docstring's definition written out per token, and chunked
    against naive (values and gradients)."""
    s, t, labels = inputs(seed=5)
    k = 8
    top = t.topk(k, dim=-1)
    teacher = TopK(top.indices.to(torch.int32), top.values)
    T = 1.7
    ls = torch.log_softmax(s / T, -1)[:, :-1][labels[:, 1:] != -100]
    ids = top.indices[:, :-1][labels[:, 1:] != -100]
    q = torch.softmax(top.values[:, :-1][labels[:, 1:] != -100] / T, -1)
    sk = ls.gather(-1, ids)
    if loss == "forward_kl":
        want = (q * (q.log() - sk)).sum(-1)
    else:  # full-vocabulary JSD with the teacher zero outside its k ids
        p_full = ls.exp()
        q_full = torch.zeros_like(p_full).scatter(-1, ids, q)
        m = (p_full + q_full) / 2
        want = 0.5 * torch.where(q_full > 0, q_full * (q_full / m).log(), 0).sum(-1) + 0.5 * (p_full * (p_full / m).log()).sum(-1)
    assert kd_topk_loss(s, teacher, labels, loss, T).item() == pytest.approx((want * T**2).mean().item(), rel=1e-5)
    naive = loss_and_grad(s, teacher, labels, loss=loss, temperature=T, ce_weight=0.2, chunk_tokens=None)
    chunked = loss_and_grad(s, teacher, labels, loss=loss, temperature=T, ce_weight=0.2, chunk_tokens=5)
    for a, b in zip(naive[:3], chunked[:3]):
        assert b.item() == pytest.approx(a.item(), rel=1e-6)
    torch.testing.assert_close(chunked[3], naive[3], rtol=1e-5, atol=1e-8)


def test_topk_refuses_reverse_kl():
    s, t, labels = inputs()
    top = t.topk(4, dim=-1)
    with pytest.raises(ValueError, match="reverse KL"):
        distill_loss(s, TopK(top.indices, top.values), labels, loss="reverse_kl", chunk_tokens=8)


def test_kd_token_loss_unchanged():
    """The naive per-token loss used by eval is the textbook forward KL."""
    s, t, _ = inputs(seed=6)
    s, t = s[0], t[0]
    p = torch.softmax(t, -1)
    want = (p * (p.log() - torch.log_softmax(s, -1))).sum(-1)
    torch.testing.assert_close(kd_token_loss(s, t), want, rtol=1e-5, atol=1e-6)


# -- the teacher cache and training on the tiny fixture ---------------------------------------
# final/ in float32 (not the fixture's bf16): these tests compare it with fp32 fake-quant bit for bit
FAST = ["data.max_train_tokens=8192", "data.max_valid_tokens=2048", "train.micro_batch_size=4", "eval.batch_size=8", "model.save_dtype=float32"]


@pytest.fixture
def at_repo(monkeypatch):
    require_tiny()
    monkeypatch.chdir(REPO)


def tiny_recipe(out: Path, *overrides: str):
    from qat.recipe import load_recipe

    return load_recipe(TINY, [f"output_dir={out}", *FAST, *overrides])


def tiny_blocks(recipe):
    from transformers import AutoTokenizer

    from qat.data import build_datasets

    tok = AutoTokenizer.from_pretrained(recipe.model.path)
    return build_datasets(recipe.data, tok, seed=recipe.train.seed)[0]


def shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.safetensors"))}


def test_cache_equals_online_topk_and_resumes_identically(at_repo, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import qat.distill.teacher_cache as tc
    from qat.recipe import RecipeError

    recipe = tiny_recipe(tmp_path / "a", "distill.teacher_cache={top_k: 16, shard_blocks: 5, batch_size: 3}")
    blocks = tiny_blocks(recipe)
    used = torch.tensor([0, 1, 7, 12, 13, 30, 31, 63])  # shards 0, 1, 2, 6, 12
    d = tc.precompute(recipe, blocks, used, progress=False)
    assert sorted(shard_bytes(d)) == [f"shard-{i:05d}.safetensors" for i in (0, 1, 2, 6, 12)]
    shard = load_file(str(d / "shard-00001.safetensors"))
    assert shard["ids"].dtype == torch.int32 and shard["ids"].shape == (5, 128, 16)

    # cached top-k == the live teacher's top-k on the same blocks, and so are the losses
    teacher = AutoModelForCausalLM.from_pretrained(recipe.teacher_path, dtype=torch.float32).eval()
    idx = torch.tensor([13, 0, 31])
    cached = tc.TeacherCache(d).lookup(idx)
    with torch.no_grad():
        t_logits = teacher(input_ids=blocks.input_ids[idx], attention_mask=blocks.attention_mask[idx]).logits
    online = t_logits.topk(16, dim=-1)
    assert torch.equal(cached.ids.long(), online.indices)
    torch.testing.assert_close(cached.logits, online.values, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    student = t_logits + 0.5 * torch.randn(t_logits.shape, generator=g)
    labels = blocks.input_ids[idx]
    a = distill_loss(student, cached, labels, chunk_tokens=100)
    b = distill_loss(student, TopK(online.indices, online.values), labels, chunk_tokens=None)
    assert a[1].item() == pytest.approx(b[1].item(), rel=1e-5) and a[1].item() > 0.01

    # an interrupted precompute (killed after 2 shards, a stale .tmp left) resumes to identical shards
    whole = shard_bytes(d)
    recipe_b = tiny_recipe(tmp_path / "b", "distill.teacher_cache={top_k: 16, shard_blocks: 5, batch_size: 3}")
    written, real_save = [0], tc.save_shard

    def dying_save(tensors, path):
        if written[0] == 2:
            path.with_name(path.name + ".tmp").write_bytes(b"torn")
            raise KeyboardInterrupt("killed")
        real_save(tensors, path)
        written[0] += 1

    monkeypatch.setattr(tc, "save_shard", dying_save)
    with pytest.raises(KeyboardInterrupt):
        tc.precompute(recipe_b, blocks, used, progress=False)
    assert len(shard_bytes(tc.cache_dir(recipe_b))) == 2
    monkeypatch.setattr(tc, "save_shard", real_save)
    assert shard_bytes(tc.precompute(recipe_b, blocks, used, progress=False)) == whole

    # reuse with the same fingerprint; another top_k or other data is refused, naming the key
    recipe_c = tiny_recipe(tmp_path / "c", f"distill.teacher_cache={{top_k: 16, shard_blocks: 5, batch_size: 4, dir: {d}}}")
    assert tc.check(recipe_c, blocks) == json.loads((d / "meta.json").read_text())["fingerprint"]
    recipe_d = tiny_recipe(tmp_path / "d", f"distill.teacher_cache={{top_k: 8, shard_blocks: 5, dir: {d}}}")
    with pytest.raises(RecipeError, match=r"distill.teacher_cache.dir: .*top_k: 16 there, 8 here"):
        tc.check(recipe_d, blocks)
    recipe_e = tiny_recipe(tmp_path / "e", f"distill.teacher_cache={{top_k: 16, shard_blocks: 5, dir: {d}}}", "data.seq_len=64")
    with pytest.raises(RecipeError, match="data_sha256: .*seq_len: 128 there, 64 here"):
        tc.check(recipe_e, tiny_blocks(recipe_e))


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_chunked_equals_naive(at_repo, tmp_path):
    from qat.cli import main

    args = [TINY, *FAST, "train.max_steps=4", "train.log_every=1", "distill.ce_weight=0.3", "distill.loss=jsd"]
    assert main(["train", *args, f"output_dir={tmp_path / 'naive'}", "distill.chunk_tokens=null"]) == 0
    assert main(["train", *args, f"output_dir={tmp_path / 'chunked'}", "distill.chunk_tokens=100"]) == 0
    naive, chunked = metrics(tmp_path / "naive"), metrics(tmp_path / "chunked")
    assert len(naive) == len(chunked) == 4
    # Step 1 sees the same weights and batch, so the two losses are the same sum in another order:
    # float32 rounding of N = 4 x 128 tokens x 8192 logits grows like log2(N) * 2^-24 ~ 1e-6
    # relative; 1e-5 leaves room for the reduction order of any BLAS. The gradient norm is the
    # same sum again.
    for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
        assert chunked[0][key] == pytest.approx(naive[0][key], rel=1e-5), (key, naive[0], chunked[0])
    # After the first update the runs are two runs, not one sum: Adam's first steps move a weight by
    # ~lr * sign(g) whatever |g|, so a gradient entry at rounding level moves its weight a whole lr
    # either way, and a latent weight that crosses a rounding boundary changes its code by a whole
    # grid step (measured: 0.2 % of codes end up different after 4 steps on llama-tiny). Those
    # discrete changes, not rounding, set the later gap (measured <= 6e-4 of the loss); 1e-2 of the
    # loss bounds it with room, and still fails a chunked loss or gradient that is wrong.
    for a, b in zip(naive[1:], chunked[1:]):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert abs(b[key] - a[key]) <= 1e-2 * a["loss"], (key, a, b)


def test_training_from_the_cache(at_repo, tmp_path, monkeypatch):
    import qat.distill.teacher_cache
    import qat.train.loop
    from qat.cli import main
    from qat.quant.grid import quantize

    real_load_models = qat.train.loop.load_models

    def load_models(recipe, config, with_teacher=True, weights=True):
        assert not with_teacher  # training from the cache never loads the teacher
        return real_load_models(recipe, config, with_teacher, weights)

    monkeypatch.setattr(qat.train.loop, "load_models", load_models)
    out = tmp_path / "cached"
    args = [TINY, *FAST, f"output_dir={out}", "data.max_train_tokens=1024", "train.max_steps=12", "train.log_every=1",
            "train.warmup_steps=0", "distill.teacher_cache={top_k: 32, shard_blocks: 4}"]
    assert main(["train", *args]) == 0
    kd = [x["kd_loss"] for x in metrics(out)]
    assert kd[-1] < 0.7 * kd[0], kd
    assert len(list((out / "teacher-cache").glob("shard-*.safetensors"))) == 2  # 8 blocks, 4 per shard
    final = load_file(str(out / "final" / "model.safetensors"))
    qparams = load_file(str(out / "final" / "qat" / "qparams.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    w, scale = final[f"{name}.weight"], qparams[f"{name}.weight_scale"]
    codes = quantize(w, scale, qparams[f"{name}.weight_zero_point"], 4, True, 64)
    assert torch.equal(codes.float() * scale.repeat_interleave(64, dim=1), w)  # final/ on the grid

    # the same run again (--overwrite keeps the cache): nothing to precompute, no teacher at all
    def no_teacher(*a, **k):
        raise AssertionError("teacher loaded")

    monkeypatch.setattr(qat.distill.teacher_cache, "load_teacher", no_teacher)
    assert main(["train", *args, "--overwrite"]) == 0
    assert [x["kd_loss"] for x in metrics(out)] == pytest.approx(kd, rel=1e-6)


def _precompute_on_two_ranks(out: str, used: list[int]) -> None:
    from accelerate import Accelerator

    import qat.distill.teacher_cache as tc

    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2
    recipe = tiny_recipe(Path(out), "distill.teacher_cache={top_k: 8, shard_blocks: 4, batch_size: 4}")
    real_save, mine = tc.save_shard, []

    def save_shard(tensors, path):  # record which shards this process writes
        mine.append(path.name)
        real_save(tensors, path)

    tc.save_shard = save_shard
    try:
        tc.precompute(recipe, tiny_blocks(recipe), torch.tensor(used), acc, progress=False)
    finally:
        tc.save_shard = real_save
    (Path(out) / f"rank{acc.process_index}.json").write_text(json.dumps(mine))


def test_precompute_on_two_processes_splits_the_shards(at_repo, tmp_path):
    """Two gloo processes each write half of the missing shards; the result equals one process's.
    Launched as real processes (`accelerate launch`): a fork of this process (debug_launcher)
    inherits its OpenMP thread pool and crashes now and then."""
    import subprocess
    import sys

    import qat.distill.teacher_cache as tc

    used = [0, 5, 9, 17, 22, 40]  # shards 0, 1, 2, 4, 5, 10
    script = tmp_path / "two_ranks.py"
    script.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_distill import _precompute_on_two_ranks\n"
        "_precompute_on_two_ranks(sys.argv[1], json.loads(sys.argv[2]))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(repo / "launch/cpu-2proc.yaml"),
         str(script), str(tmp_path / "two"), json.dumps(used)],
        capture_output=True, text=True, cwd=repo, env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe = tiny_recipe(tmp_path / "one", "distill.teacher_cache={top_k: 8, shard_blocks: 4, batch_size: 4}")
    one = tc.precompute(recipe, tiny_blocks(recipe), torch.tensor(used), progress=False)
    two = shard_bytes(tmp_path / "two" / "teacher-cache")
    assert sorted(two) == [f"shard-{i:05d}.safetensors" for i in (0, 1, 2, 4, 5, 10)]
    assert two == shard_bytes(one)
    written = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(written[0]) == len(written[1]) == 3 and sorted(written[0] + written[1]) == sorted(two)
