"""Data-free distillation data (qat/data/generate.py): teacher samples, cached as shards, resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import LLAMA_TINY, needs_tiny, require_tiny
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
pytestmark = needs_tiny  # every test here runs on llama-tiny; a mark skips before module fixtures set up
TINY = str(REPO / "recipes/tiny/w4-ovfreeze.yaml")
GEN = ["data.source=teacher-generated", "data.files=null", "data.generate.count=10", "data.generate.length=24",
       "data.generate.batch_size=4", "data.generate.top_k=20", "data.generate.temperature=0.9", "data.seq_len=16"]


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    require_tiny()
    monkeypatch.chdir(REPO)


def _recipe(tmp_path, *extra):
    from qat.recipe import load_recipe

    return load_recipe(TINY, [f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", *GEN, *extra])


def _tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAMA_TINY)


def test_generated_cache_shards_resume_and_reuse(tmp_path, monkeypatch):
    from qat.data import generate

    recipe = _recipe(tmp_path)
    d = generate.generate_cached(recipe, _tok(), "cpu", progress=False)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["complete"] and meta["shards"] == 3 and meta["length"] == 24
    shards = [load_file(str(d / f"shard-{i:05d}.safetensors"))["input_ids"] for i in range(3)]
    assert [s.shape for s in shards] == [(4, 24), (4, 24), (2, 24)]
    ids = torch.cat(shards)
    assert int(ids[:, 0].ne(0).all()) and int(ids.ne(0).all())  # no <|endoftext|> (id 0): full-length samples
    assert len({tuple(r.tolist()) for r in ids}) == 10  # sampled, not greedy copies
    # interrupted after shard 0: the rest is regenerated, identically
    os.remove(d / "shard-00001.safetensors")
    os.remove(d / "shard-00002.safetensors")
    (d / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    (d / "shard-00003.safetensors.tmp").write_bytes(b"torn")  # a torn write is ignored
    mtime0 = (d / "shard-00000.safetensors").stat().st_mtime_ns
    generate.generate_cached(recipe, _tok(), "cpu", progress=False)
    assert (d / "shard-00000.safetensors").stat().st_mtime_ns == mtime0  # kept, not rewritten
    again = torch.cat([load_file(str(d / f"shard-{i:05d}.safetensors"))["input_ids"] for i in range(3)])
    assert torch.equal(again, ids)
    # complete: reused by a later run without loading the teacher
    monkeypatch.setattr(generate, "sample_batch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    train, valid = generate.build_run_datasets(recipe, _tok())
    assert train.input_ids.shape == (10, 16) and torch.equal(train.input_ids, ids[:, :16].long())
    assert valid is not None and valid.seq_len == 16
    # another seed is another cache
    assert generate.cache_dir(_recipe(tmp_path, "data.generate.seed=1")) != d


def test_teacher_generated_recipe_checks(tmp_path):
    from qat.recipe import RecipeError

    with pytest.raises(RecipeError, match="teacher"):
        _recipe(tmp_path, "teacher=null", "distill.ce_weight=1")
    with pytest.raises(RecipeError, match="valid_fraction"):
        _recipe(tmp_path, "data.valid_files=null", "data.valid_fraction=0.1")


def test_train_on_teacher_generated_data(tmp_path):
    from qat.cli import main

    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", *GEN, "train.max_steps=2", "train.micro_batch_size=4",
                 "data.max_valid_tokens=512", "eval.batch_size=8", "train.log_every=1"]) == 0
    assert (out / "generated-data").is_dir() and any((out / "generated-data").glob("*/shard-00000.safetensors"))
    assert json.loads((out / "eval.json").read_text())["student"]["ppl"] > 0


def test_two_processes_share_the_sampling_and_match_one(tmp_path):
    """Under `accelerate launch` (2 gloo processes) both ranks sample their share of the shards
    (no rank waits at a barrier for the main one to do it all), and the shards equal one process's:
    shard i is seeded by i, whoever samples it."""
    import subprocess
    import sys

    from qat.data import generate

    one = generate.generate_cached(_recipe(tmp_path / "one"), _tok(), "cpu", progress=False)
    two_cache = tmp_path / "two" / "cache"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qat", "train", TINY, f"output_dir={tmp_path / 'two' / 'run'}",
           f"data.cache_dir={two_cache}", *GEN, "data.valid_files=null", "train.max_steps=1", "train.micro_batch_size=1", "eval.every=0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = next(two_cache.glob("*/"))  # the keyed cache directory
    assert json.loads((two / "meta.json").read_text())["complete"] is True
    names = sorted(p.name for p in one.glob("shard-*.safetensors"))
    assert names == sorted(p.name for p in two.glob("shard-*.safetensors")) and len(names) == 3
    for n in names:
        assert torch.equal(load_file(str(one / n))["input_ids"], load_file(str(two / n))["input_ids"]), n
