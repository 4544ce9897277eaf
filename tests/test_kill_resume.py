"""Kill-and-resume: SIGKILL a training run at seeded random points, some of them inside checkpoint
writing, resume each time with ``checkpoint.resume=auto``, and end bit-identical to a run that
was never interrupted (CPU, one process): final weights, the last checkpoint's optimizer state,
and every metrics.jsonl row (timing fields aside).

Each run is a separate process running ``qat.cli.main`` (what ``python -m qat`` runs). To keep the
test quick, the processes are forked from one "zygote" interpreter that has already imported
torch / transformers / qat (but run nothing), so a restart costs no import time. To land a kill
inside a checkpoint write deterministically, a child may be told to stop at one of these points
and wait to be killed (the patching lives here, in the test, not in qat):

- ``mid-save``: inside ``accelerator.save_state``, models written, ``optimizer.bin`` not yet;
- ``before-marker``: ``save_state`` done, ``qat_state.json`` not yet written;
- ``before-rename``: ``qat_state.json`` written in ``.tmp-step-N``, not yet renamed;
- ``final``: ``final/`` written, ``eval.json`` not yet.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import require_tiny
from safetensors.torch import load_file

from qat.io.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes/tiny/w4-ovfreeze.yaml")
MAX_STEPS, EVERY = 12, 2
ARGS = [
    "data.max_train_tokens=4096", "data.valid_files=null", "train.micro_batch_size=4",  # 32 blocks: 8 steps an epoch
    f"train.max_steps={MAX_STEPS}", "train.warmup_steps=2", "train.log_every=1",
    f"checkpoint.every={EVERY}", "checkpoint.keep=2", "checkpoint.resume=auto",
]
TIMING = ("tokens_per_s", "step_time_s", "peak_mem_gb")

ZYGOTE = r'''
import json, os, signal, sys, time, traceback
import accelerate, accelerate.checkpointing, datasets, torch, transformers  # imported once, run nothing
import datasets.packaged_modules.text, safetensors.torch, tqdm.auto
import qat.io.checkpoint, qat.cli, qat.data, qat.evaluate.perplexity, qat.io.final, qat.train.loop, qat.cli.train
from transformers.models.llama import modeling_llama
for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "PreTrainedTokenizerFast", "LlamaForCausalLM"):
    getattr(transformers, name)  # resolve transformers' lazy modules here, not in every child

signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel


def stop_here(marker, what):
    with open(marker, "w") as f:
        f.write(what)
    time.sleep(600)  # until killed


def install_pause(where, marker):
    if where == "mid-save":
        orig = accelerate.checkpointing.save
        def save(obj, f, *a, **k):
            if str(f).endswith("optimizer.bin"):
                stop_here(marker, str(f))
            return orig(obj, f, *a, **k)
        accelerate.checkpointing.save = save
    elif where == "before-marker":
        orig = accelerate.Accelerator.save_state
        def save_state(self, output_dir=None, *a, **k):
            out = orig(self, output_dir, *a, **k)
            stop_here(marker, str(output_dir))
            return out
        accelerate.Accelerator.save_state = save_state
    elif where == "before-rename":
        orig = qat.io.checkpoint.write_json_atomic
        def write(path, obj):
            orig(path, obj)
            stop_here(marker, str(path))
        qat.io.checkpoint.write_json_atomic = write
    elif where == "final":
        orig = qat.train.lora.save_final  # the name save_lora_final calls
        def save_final(*a, **k):
            out = orig(*a, **k)
            stop_here(marker, "final")
            return out
        qat.train.lora.save_final = save_final
    else:
        raise ValueError(where)


for line in sys.stdin:
    cmd = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if cmd.get("pause"):
                install_pause(cmd["pause"], cmd["marker"])
            code = qat.cli.main(cmd["argv"])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            with open(cmd["status"], "w") as f:
                f.write(str(code))
            os._exit(code)
    print(pid, flush=True)
'''


class Zygote:
    def __init__(self, tmp: Path):
        self.tmp, self.n = tmp, 0
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=REPO)

    def start(self, out: Path, pause: str | None = None) -> tuple[int, dict]:
        self.n += 1
        files = {k: self.tmp / f"run{self.n}.{k}" for k in ("log", "status", "marker")}
        cmd = {"argv": ["train", TINY, f"output_dir={out}", *ARGS], "pause": pause, **{k: str(v) for k, v in files.items()}}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline()), files

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def kill(pid: int) -> bool:
    """SIGKILL and wait until gone; False if it had already ended."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    deadline = time.time() + 30
    while alive(pid):
        assert time.time() < deadline, f"process {pid} survived SIGKILL"
        time.sleep(0.01)
    return True


def wait_until(cond, pid: int, files: dict, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not cond():
        if files["status"].exists() or not alive(pid):
            log = files["log"].read_text()[-3000:] if files["log"].exists() else ""
            raise AssertionError(f"run ended before {what}:\n{log}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def finish(pid: int, files: dict, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not files["status"].exists():
        assert time.time() < deadline, "run did not finish"
        time.sleep(0.05)
    log = files["log"].read_text()
    assert files["status"].read_text() == "0", log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def logged_steps(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(x)["step"] for x in lines if x.endswith("}")]
    return max(steps, default=0)


def ckpt_step(out: Path) -> int:
    latest = latest_checkpoint(out / "checkpoints")
    return int(latest.name.removeprefix("step-")) if latest else 0


def rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture
def zygote(tmp_path, monkeypatch):
    require_tiny()
    z = Zygote(tmp_path)
    yield z
    z.close()


def test_sigkill_at_random_points_then_resume_is_bit_identical(zygote, tmp_path):
    rng = random.Random(20261123)
    ref, out = tmp_path / "uninterrupted", tmp_path / "killed"

    # the reference, started first so that it runs while the kills happen
    ref_pid, ref_files = zygote.start(ref)

    # six kills: three at random moments, three (and the final/ one) inside writes
    plan = ["time", "mid-save", "time", "before-marker", "before-rename", "time", "final"]
    kills = []
    for kind in plan:
        before = ckpt_step(out)
        if kind == "time":
            pid, files = zygote.start(out)
            target = min(MAX_STEPS - 2, before + rng.randint(1, 3))  # a logged step past the checkpoint
            wait_until(lambda: logged_steps(out) >= target, pid, files, f"step {target}")
            time.sleep(rng.uniform(0.0, 0.6))  # then anywhere in the next step(s), checkpoint writes included
        else:
            pid, files = zygote.start(out, pause=kind)
            wait_until(lambda: files["marker"].exists(), pid, files, f"pause {kind}")
        killed = kill(pid) and not files["status"].exists()
        after = ckpt_step(out)
        if killed:
            kills.append((kind, before, after, logged_steps(out)))
        if kind in ("mid-save", "before-marker", "before-rename"):
            # killed while writing step-N: it exists only as .tmp-step-N and is never the latest
            tmp = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-step-"))
            assert tmp == [f".tmp-step-{before + EVERY}"], (kind, tmp)
            assert after == before, (kind, before, after)
        if kind == "final":  # killed inside the final/ write: it is atomic, so there is no partial final/
            assert after == MAX_STEPS and not (out / "final").exists()
            assert [p.name for p in out.glob(".final.tmp-*")], sorted(p.name for p in out.iterdir())

    assert len(kills) >= 5 and sum(k[0] != "time" for k in kills) >= 3, kills
    pid, files = zygote.start(out)  # the last resume runs to the end
    finish(pid, files)
    finish(ref_pid, ref_files)
    assert "resumed from" in files["log"].read_text()

    # final weights and quantization parameters
    for name in ("model.safetensors", "qat/qparams.safetensors"):
        a, b = load_file(str(ref / "final" / name)), load_file(str(out / "final" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    # the last checkpoint: optimizer state (read without unpickling arbitrary objects) and weights
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(p.name for p in (ref / "checkpoints").iterdir())
    last = f"step-{MAX_STEPS}"
    opt_a = torch.load(ref / "checkpoints" / last / "optimizer.bin", weights_only=True)
    opt_b = torch.load(out / "checkpoints" / last / "optimizer.bin", weights_only=True)
    assert_same_state(opt_a, opt_b, "optimizer")
    assert all(s["step"].item() == MAX_STEPS for s in opt_b["state"].values())
    assert_same_state(load_file(str(ref / "checkpoints" / last / "model.safetensors")),
                      load_file(str(out / "checkpoints" / last / "model.safetensors")), "checkpoint model")
    # every logged row, in order, once
    ra, rb = rows(ref), rows(out)
    assert [r["step"] for r in ra] == list(range(1, MAX_STEPS + 1))
    assert ra == rb
    assert json.loads((out / "eval.json").read_text())["steps"] == MAX_STEPS
