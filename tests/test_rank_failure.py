"""A failure on one rank ends every rank, in bounded time, with that rank's message: two gloo
processes through `accelerate launch`, a disk error injected on rank 1 inside a checkpoint write."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import PRETRAIN, SCRATCH_SMALL

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
    assert "injected on rank 1" in out and "qat: training stopped: could not write checkpoint step-2" in out, out[-3000:]
    assert took < 200, took  # ended by the failure, not by a collective's timeout (30 minutes for gloo)
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))
