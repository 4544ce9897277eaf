"""What a new user mistypes ends in one or two lines and exit code 2 (Ctrl-C: 130), no traceback.

None of these needs the ../shared fixtures: the from-scratch quickstart recipe stands in for a model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PRETRAIN, SCRATCH_SMALL  # noqa: E402

from qat.cli import main

REPO = Path(__file__).resolve().parents[1]


def short(err: str, lines: int = 2) -> str:
    assert "Traceback" not in err, err
    assert 1 <= len(err.strip().splitlines()) <= lines, err
    return err


def test_eval_of_a_mistyped_run_is_never_sent_to_the_hub(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # would retry the hub for ~1 minute if it were asked
    for typo in ("runs/typo", "./typo", "a/b/c", "~/no-such-qat-run-xyz"):
        t0 = time.perf_counter()
        assert main(["eval", typo]) == 2, typo
        assert time.perf_counter() - t0 < 5, typo
        assert f"no such directory: {typo}" in short(capsys.readouterr().err), typo


def test_eval_reports_every_missing_argument_at_once(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # no weights: nothing may load before the check
    assert main(["eval", str(model)]) == 2
    err = capsys.readouterr().err
    assert "--seq-len: required" in err and "--data: required" in err, err
    assert "Traceback" not in err


def test_eval_unknown_data_format_names_the_flag(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "corpus.dat"
    data.write_text("some text\n")
    assert main(["eval", str(model), "--seq-len", "8", "--data", str(data)]) == 2
    err = short(capsys.readouterr().err)
    assert "--data-format" in err and "data.format" not in err, err


def test_unknown_recipe_key_suggests_the_closest(tmp_path, capsys):
    assert main(["train", PRETRAIN, f"output_dir={tmp_path / 'x'}", "train.lrr=1e-3", "lr=2", "quant.bitz=3"]) == 2
    err = capsys.readouterr().err
    assert "train.lrr: unknown key (did you mean train.lr?)" in err
    assert "\n  lr: unknown key (did you mean train.lr or ptq.block_ap.lr?)" in err  # every key of that name, train's first
    assert "quant.bitz: unknown key (did you mean quant.bits?)" in err


def test_multi_process_launch_without_cpu_flag_is_one_line(tmp_path, capsys, monkeypatch):
    """What `accelerate launch --multi_gpu --num_processes 2` gives each rank on a machine without
    GPUs: WORLD_SIZE=2, but Accelerate (no ACCELERATE_USE_CPU) sees one process."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    out = tmp_path / "run"
    assert main(["train", PRETRAIN, f"output_dir={out}", *SCRATCH_SMALL]) == 2
    err = short(capsys.readouterr().err, 1)
    assert "ACCELERATE_USE_CPU=1" in err and not out.exists()


def start_endless(tmp_path, *extra):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "qat", "train", PRETRAIN, f"output_dir={out}", *SCRATCH_SMALL, "train.max_steps=100000",
            "train.log_every=1", "eval.every=0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    # a background job (`nohup ... &`, a CI runner) inherits SIGINT ignored, and Python then installs
    # no KeyboardInterrupt handler: give the child the default disposition, as a terminal would
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2) \
            and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    return proc, out


@pytest.mark.parametrize("sig,every", [(signal.SIGINT, 1), (signal.SIGTERM, 1000)])
def test_a_stop_signal_checkpoints_at_the_step_boundary_and_says_where(tmp_path, sig, every):
    """Ctrl-C, or the SIGTERM a scheduler sends before it preempts a job: the run stops at the next
    step boundary with a checkpoint (when the recipe checkpoints: here every 1000 steps, never
    reached), says where and how to resume, and exits 128 + the signal."""
    proc, out = start_endless(tmp_path, f"checkpoint.every={every}")
    try:
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err, err[-3000:]
    assert f"received: stopping after this step" in err, err[-2000:]
    assert f"qat: interrupted ({sig.name}). Last checkpoint:" in last and "checkpoint.resume=auto" in last, last
    step = last.split("Last checkpoint: ")[1].split(";")[0]
    assert Path(step).is_dir() and Path(step).parent == out / "checkpoints", last
    logged = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert Path(step).name == f"step-{max(logged)}", (step, logged)  # the last step taken is the one kept


def test_a_second_stop_signal_stops_at_once(capsys):
    from qat.train.loop import Interrupted, stop_requests

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stopped:
        with stop_requests(main=True) as got:
            os.kill(os.getpid(), signal.SIGTERM)  # the first: noted, the loop stops at its next step boundary
            assert got == [signal.SIGTERM]
            os.kill(os.getpid(), signal.SIGTERM)  # the second: at once
            raise AssertionError("the second signal did not stop")
    assert stopped.value.signum == signal.SIGTERM
    assert "SIGTERM received: stopping after this step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are the loop's only
