"""Checkpoints that can be trusted (``qat/io/checkpoint.py``): checksums verified on resume with a
fallback to the newest good checkpoint, never a silent wrong resume; no checkpoint written while
steps are skipped, and pruning keeps the last one from before the trouble. No fixtures needed."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from conftest import PRETRAIN, SCRATCH_SMALL  # noqa: E402

import qat.train.loop
from qat.cli import main
from qat.io.checkpoint import checkpoint_dirs, checkpoint_problem

REPO = Path(__file__).resolve().parents[1]
SMALL = [*SCRATCH_SMALL, "train.log_every=1", "train.warmup_steps=0"]


def train(out: Path, *extra: str) -> int:
    return main(["train", PRETRAIN, f"output_dir={out}", *SMALL, *extra])


@pytest.fixture(scope="module")
def three_ckpts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train(out, "train.max_steps=4", "checkpoint.every=1", "checkpoint.keep=3") == 0
    assert [s for s, _ in checkpoint_dirs(out / "checkpoints")] == [2, 3, 4]
    return out


def copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def flip_byte(path: Path, at: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "byte flip in the model": lambda c: flip_byte(c / "model.safetensors"),
    "truncated optimizer": lambda c: (c / "optimizer.bin").write_bytes((c / "optimizer.bin").read_bytes()[:100]),
    "deleted rng state": lambda c: (c / "random_states_0.pkl").unlink(),
    "state is '{'": lambda c: (c / "qat_state.json").write_text("{"),
    "state is {}": lambda c: (c / "qat_state.json").write_text("{}"),
    "step is 'abc'": lambda c: (c / "qat_state.json").write_text(json.dumps({**json.loads((c / "qat_state.json").read_text()), "step": "abc"})),
    "step 999 beyond the run": lambda c: (c / "qat_state.json").write_text(json.dumps({**json.loads((c / "qat_state.json").read_text()), "step": 999})),
}


def test_checkpoints_carry_checksums(three_ckpts):
    state = json.loads((three_ckpts / "checkpoints" / "step-4" / "qat_state.json").read_text())
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(state["files"])
    assert checkpoint_problem(three_ckpts / "checkpoints" / "step-4") is None


@pytest.mark.parametrize("what", list(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(what, three_ckpts, tmp_path, capsys):
    run = copy(three_ckpts, tmp_path)
    CORRUPTIONS[what](run / "checkpoints" / "step-4")
    assert train(run, "train.max_steps=6", "checkpoint.every=1", "checkpoint.keep=3", "checkpoint.resume=auto") == 0
    out = capsys.readouterr().out
    assert "checkpoint.resume: passed over step-4:" in out, out
    assert f"resumed from {run / 'checkpoints' / 'step-3'} at step 3" in out, out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the rows past step 3 were redone, not kept twice


def test_no_good_checkpoint_stops_with_a_message_and_deletes_nothing(three_ckpts, tmp_path, capsys):
    run = copy(three_ckpts, tmp_path)
    for s in (2, 3, 4):
        flip_byte(run / "checkpoints" / f"step-{s}" / "model.safetensors")
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert train(run, "train.max_steps=6", "checkpoint.every=1", "checkpoint.resume=auto") == 1
    err = capsys.readouterr().err
    assert "no checkpoint under" in err and "passed over step-2" in err and "Traceback" not in err, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == names


def test_an_explicit_corrupt_checkpoint_is_refused(three_ckpts, tmp_path, capsys):
    run = copy(three_ckpts, tmp_path)
    ckpt = run / "checkpoints" / "step-3"
    flip_byte(ckpt / "model.safetensors")
    assert train(run, "train.max_steps=6", f"checkpoint.resume={ckpt}") == 1
    assert "model.safetensors does not match its checksum" in capsys.readouterr().err


def test_a_nan_stretch_writes_no_checkpoint_and_keeps_the_last_good_one(tmp_path, monkeypatch):
    real, calls = qat.train.loop.distill_loss, [0]

    def distill_loss(*a, **k):  # steps 3 to 5 see a non-finite loss
        calls[0] += 1
        loss, kd, ce = real(*a, **k)
        return (loss * float("nan") if calls[0] in (3, 4, 5) else loss), kd, ce

    monkeypatch.setattr(qat.train.loop, "distill_loss", distill_loss)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train(out, "train.max_steps=8", "checkpoint.every=1", "checkpoint.keep=1", "train.max_bad_steps=5") == 0
    steps = [s for s, _ in checkpoint_dirs(out / "checkpoints")]
    assert steps == [2, 8], steps  # none at 3-5 (skipped); keep=1 keeps the newest, and step-2 from before the NaNs
    state = json.loads((out / "checkpoints" / "step-8" / "qat_state.json").read_text())
    assert state["bad_steps"] == 3 and state["clean_step"] == 2
