"""`qat train` itself, sharded with FSDP2 on 2 CPU processes through `accelerate launch`.

`launch/cpu-2proc-fsdp2.yaml` is an FSDP2 launch config (the fsdp_config of
`launch/fsdp2-8gpu.yaml`) on 2 processes; Accelerate would run it on CPU as plain DDP, and
`qat.dist.fsdp_on_cpu` (called where the run makes its Accelerator) switches it to Accelerate's own
FSDP2 path. So this runs the real loop sharded: the student and the teacher are ``fully_shard``-ed,
checkpoints are Accelerate's sharded ones, final/ is gathered from the shards. The recipe has an
odd number of validation blocks (15: ranks get 8 and 7, the short one runs a masked padding
batch), an in-loop evaluation, checkpoints every 2 steps, and the run is killed right after its
step-4 checkpoint and resumed. Checked:

- the resumed run ends bit-identical to the uninterrupted sharded run (final/ and every loss);
- the sharded evaluation (eval.json) equals a 1-process `qat eval` of the same final/;
- final/ against a 1-process run on the same global batches: ov-frozen layers bit-identical,
  first loss within 1e-6, the rest within the reduction-order bounds of the DDP test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_finals_match, needs_tiny
from safetensors.torch import load_file

from qat.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes/tiny/w4-ovfreeze.yaml")
pytestmark = needs_tiny
STEPS, LR = 8, 5e-4
COMMON = [  # 64 training blocks of 128 tokens; 15 validation blocks (1920 tokens): an odd number
    "data.max_train_tokens=8192", "data.max_valid_tokens=1920", "eval.batch_size=4", "model.save_dtype=float32",
    f"train.max_steps={STEPS}", "train.log_every=1", "eval.every=4", "checkpoint.every=2", "checkpoint.resume=auto",
]
# Loaded by every Python process started with this directory on PYTHONPATH: in the two ranks
# (RANK set by the launcher, not in the launcher itself) it kills the process right after the
# checkpoint of step QAT_TEST_KILL_AFTER is complete, as a crash or a preemption would.
KILLER = '''
import os, signal
if "RANK" in os.environ and os.environ.get("QAT_TEST_LOADS"):  # which rank read which model's weights
    import transformers
    _load = transformers.AutoModelForCausalLM.from_pretrained.__func__
    def _logged(cls, path, *args, **kwargs):
        with open(os.environ["QAT_TEST_LOADS"], "a") as f:
            f.write(f"{os.environ['RANK']} {os.path.basename(str(path))}\\n")
        return _load(cls, path, *args, **kwargs)
    transformers.AutoModelForCausalLM.from_pretrained = classmethod(_logged)
if "RANK" in os.environ and os.environ.get("QAT_TEST_KILL_AFTER"):
    import qat.train.loop as loop
    _save, _at = loop.save_checkpoint, int(os.environ["QAT_TEST_KILL_AFTER"])
    def save_then_die(accelerator, root, step, *args, **kwargs):
        path = _save(accelerator, root, step, *args, **kwargs)
        if step == _at:
            os.kill(os.getpid(), signal.SIGKILL)
        return path
    loop.save_checkpoint = save_then_die
'''


def launch_fsdp(out: Path, tmp: Path, kill_after: int | None = None) -> subprocess.CompletedProcess:
    (tmp / "killer").mkdir(exist_ok=True)
    (tmp / "killer" / "sitecustomize.py").write_text(KILLER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp / "killer"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    if kill_after is not None:
        env["QAT_TEST_KILL_AFTER"] = str(kill_after)
    env["QAT_TEST_LOADS"] = str(out.parent / f"{out.name}.loads")
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/cpu-2proc-fsdp2.yaml"),
         "-m", "qat", "train", TINY, f"output_dir={out}", *COMMON, "train.micro_batch_size=2"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    whole = tmp / "whole"
    proc = launch_fsdp(whole, tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    killed = tmp / "killed"
    proc = launch_fsdp(killed, tmp, kill_after=4)
    assert proc.returncode != 0, "the run was meant to be killed after its step-4 checkpoint"
    assert (killed / "checkpoints" / "step-4" / "qat_state.json").is_file() and not (killed / "final").exists()
    proc = launch_fsdp(killed, tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed_log = proc.stdout + proc.stderr
    one = tmp / "one"
    assert main(["train", TINY, f"output_dir={one}", *COMMON, "train.micro_batch_size=4"]) == 0
    return {"whole": whole, "killed": killed, "resumed_log": resumed_log, "one": one, "tmp": tmp}


def test_the_run_really_is_sharded(runs):
    """Accelerate's sharded checkpoint layout (one shard file per rank), not DDP's model.safetensors."""
    ckpt = runs["whole"] / "checkpoints" / f"step-{STEPS}"
    shards = sorted(p.name for p in (ckpt / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"], shards
    assert not (ckpt / "model.safetensors").exists()
    assert json.loads((runs["whole"] / "eval.json").read_text())["processes"] == 2


def test_weights_are_read_once_by_the_main_process(runs):
    """Student, teacher and, for the closing evaluation, final/: read by rank 0 alone (rank 1 builds
    their structure and takes its shards from rank 0's broadcast), in every launch."""
    loads = (runs["tmp"] / "whole.loads").read_text().split("\n")
    loads = [line.split() for line in loads if line]
    assert [rank for rank, _ in loads] == ["0"] * len(loads), loads
    assert sorted(name for _, name in loads) == ["final", "llama-tiny", "llama-tiny"], loads  # student, teacher, final/


def test_killed_and_resumed_sharded_run_is_bit_identical(runs):
    assert "resumed from" in runs["resumed_log"] and "step-4 at step 4" in runs["resumed_log"]
    a = load_file(str(runs["whole"] / "final" / "model.safetensors"))
    b = load_file(str(runs["killed"] / "final" / "model.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    drop = ("tokens_per_s", "step_time_s", "peak_mem_gb")
    clean = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]  # noqa: E731
    assert clean(rows(runs["whole"])) == clean(rows(runs["killed"]))
    assert [r["step"] for r in rows(runs["whole"]) if "loss" in r] == list(range(1, STEPS + 1))
    assert any("val_loss" in r or "val_ppl" in r for r in rows(runs["whole"])), "no in-loop evaluation logged"


def test_sharded_evaluation_equals_one_process_eval(runs, tmp_path):
    """15 validation blocks on 2 ranks (8 + 7, one padded batch masked out) = 1 process."""
    sharded = json.loads((runs["whole"] / "eval.json").read_text())["student"]
    assert main(["eval", str(runs["whole"]), "--no-teacher", "--batch-size", "4", "--out", str(tmp_path / "e.json")]) == 0
    single = json.loads((tmp_path / "e.json").read_text())
    assert single["tokens"] == sharded["tokens"] == 15 * 127
    assert single["ppl"] == pytest.approx(sharded["ppl"], rel=1e-5)


def test_sharded_final_matches_one_process_run(runs):
    """Same global batches (2 ranks x 2 = 1 x 4): frozen layers exact, the rest within the
    reduction-order bounds stated in test_train.test_ddp_two_processes_match_one."""
    ra, rb = rows(runs["one"]), rows(runs["whole"])
    la = [r["loss"] for r in ra if "loss" in r]
    lb = [r["loss"] for r in rb if "loss" in r]
    # Step 1 sees the same weights and batch (float rounding only). Later the two runs' codes drift
    # apart (a latent weight on a rounding boundary snaps to the neighbouring code), and the KD loss
    # (~0.07 here) moves relatively a lot with a few codes: measured 0.5 % and 1.3 % by step 4 (two
    # machines), 4.2 % at most by step 8 (the weights below stay >= 99 % code-identical); allowed:
    # 3 % by step 4 (the DDP test's bound) and 8 % after.
    assert la[0] == pytest.approx(lb[0], rel=1e-6)
    assert la[:4] == pytest.approx(lb[:4], rel=3e-2)
    assert la == pytest.approx(lb, rel=8e-2)
    assert assert_finals_match(runs["one"], runs["whole"], LR, STEPS) == 8
