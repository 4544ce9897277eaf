"""A failure on one rank ends every rank, in bounded time, with that rank's message: two gloo
processes through `accelerate launch`, an error injected on rank 1 inside a checkpoint write,
inside the sampling of teacher-generated data, and inside the teacher's top-k cache (the other
rank is then waiting at a barrier: only the failing rank's exit, which the launcher turns into the
end of the whole group, can free it; a gloo collective would wait 30 minutes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PRETRAIN, SCRATCH_SMALL, needs_tiny

REPO = Path(__file__).resolve().parents[1]
DRIVER = '''
import os, sys
import accelerate
save_state = accelerate.Accelerator.save_state
def failing_save_state(self, *a, **k):
    if int(os.environ.get("RANK", "0")) == 1:
        raise OSError(28, "No space left on device (injected on rank 1)")
    return save_state(self, *a, **k)
accelerate.Accelerator.save_state = failing_save_state
from qat.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_a_rank_that_fails_in_a_checkpoint_write_ends_the_run(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(driver), "train", PRETRAIN, f"output_dir={tmp_path / 'run'}",
           *SCRATCH_SMALL, "train.max_steps=4", "checkpoint.every=2"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    # rank 1's own message: its (injected) full disk
    assert f"qat: training stopped: could not write checkpoint step-2 in {tmp_path / 'run' / 'checkpoints'} (no space left on" in out, out[-3000:]
    assert took < 200, took  # ended by the failure, not by a collective's timeout (30 minutes for gloo)
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))


FAIL_IN = '''
import importlib, os, sys
module, name = sys.argv.pop(1).rsplit(":", 1)
mod = importlib.import_module(module)
real = getattr(mod, name)
def failing(*a, **k):
    if int(os.environ.get("RANK", "0")) == 1:
        raise RuntimeError(f"{name} failed (injected on rank 1)")
    return real(*a, **k)
setattr(mod, name, failing)
from qat.cli import main
sys.exit(main(sys.argv[1:]))
'''
TINY = str(REPO / "recipes/tiny/w4-ovfreeze.yaml")


@needs_tiny
@pytest.mark.parametrize(
    "target, overrides",
    [
        ("qat.data.generate:sample_batch", ["data.source=teacher-generated", "data.files=null", "data.valid_files=null",
                                            "data.generate.count=16", "data.generate.length=24", "data.generate.batch_size=4", "data.seq_len=16"]),
        ("qat.distill.teacher_cache:teacher_topk", ["data.max_train_tokens=8192", "data.valid_files=null",
                                                    "distill.teacher_cache={top_k: 8, shard_blocks: 4, batch_size: 4}"]),
    ],
    ids=["teacher-generated data", "teacher cache"],
)
def test_a_rank_that_fails_while_the_teacher_works_ends_the_run(tmp_path, target, overrides):
    driver = tmp_path / "driver.py"
    driver.write_text(FAIL_IN)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/cpu-2proc.yaml"),
           str(driver), target, "train", TINY, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
           *overrides, "train.max_steps=2", "train.micro_batch_size=2"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "failed (injected on rank 1)" in out, out[-3000:]
    assert took < 200, took  # ended by the failure, not by a collective's timeout
    assert not (tmp_path / "run" / "final").exists()


SLOW_FINAL = '''
import os, sys, time
import qat.train.loop as loop
save = loop.save_lora_final
def slow_save(*a, **k):
    time.sleep(15)  # the main process's final/ write, slower than the collective timeout
    return save(*a, **k)
loop.save_lora_final = slow_save
from qat.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_a_rank_waiting_past_the_collective_timeout_says_for_what(tmp_path):
    """train.collective_timeout_s is the process group's timeout; the rank that waits for the main
    process's final/ write longer than that stops with one line naming the step and the key."""
    driver = tmp_path / "driver.py"
    driver.write_text(SLOW_FINAL)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(driver), "train", PRETRAIN, f"output_dir={tmp_path / 'run'}",
           *SCRATCH_SMALL, "train.max_steps=2", "train.collective_timeout_s=5"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert ("qat: training stopped: rank 1 waited past the collective timeout for the main process writing final/; "
            "if that step is only slow at this model size, raise train.collective_timeout_s") in out, out[-3000:]


def test_the_default_collective_timeout_grows_with_the_model(tmp_path):
    """null: 1800 s plus 1 s per 10 MB of model.path's weight files (what the main process alone
    reads and writes); a from-scratch model gets 1800 s; a set value is taken as it is."""
    from qat.recipe import load_recipe
    from qat.train.tracking import collective_timeout

    model = tmp_path / "model"
    model.mkdir()
    for i, size in enumerate((6_000_000_000, 10_000_000_000)):  # sparse files: no disk used
        with open(model / f"model-0000{i + 1}-of-00002.safetensors", "wb") as f:
            f.truncate(size)
    (model / "notes.bin").write_bytes(b"x" * 1000)  # not a weight file
    recipe = load_recipe(PRETRAIN, ["model.config=null", f"model.path={model}"], check_files=False)
    assert collective_timeout(recipe) == 1800 + 1600
    assert collective_timeout(load_recipe(PRETRAIN)) == 1800
    assert collective_timeout(load_recipe(PRETRAIN, ["train.collective_timeout_s=90"])) == 90


def test_a_resume_may_change_the_collective_timeout():
    """The timeout trains nothing: a run stopped by it resumes with a longer one (or the default)."""
    from qat.train.identity import compare

    old = {"recipe": {"train.collective_timeout_s": 7200, "train.seed": 0}}
    refused, allowed = compare(old, {"recipe": {"train.collective_timeout_s": None, "train.seed": 0}})
    assert refused == [] and allowed == []
    refused, _ = compare(old, {"recipe": {"train.collective_timeout_s": 7200, "train.seed": 1}})
    assert refused == ["train.seed 0 -> 1"]
