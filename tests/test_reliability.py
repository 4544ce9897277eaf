"""Faults during a run, and what a run may load and write.

- numerical: NaN / inf in the loss or the gradients -> the step is skipped (no update), up to
  ``train.max_bad_steps``; past it the run stops with a clear message, the last checkpoint intact;
- disk: a checkpoint write failing (ENOSPC) -> a clear error, the previous checkpoint kept;
- security: ``trust_remote_code`` off unless set (and then printed); resuming unpickles no
  arbitrary objects; a run writes nothing outside its output_dir; the wandb key is written nowhere.

All in-process through ``qat.cli.main`` on the llama-tiny fixture, small and quick.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import needs_tiny, require_tiny  # noqa: E402
from safetensors.torch import load_file

import qat.train.loop
from qat.cli import main
from qat.io.checkpoint import file_hashes, latest_checkpoint, state_digest

REPO = Path(__file__).resolve().parents[1]
pytestmark = needs_tiny  # every test here runs on llama-tiny; a mark skips before module fixtures set up
TINY = str(REPO / "recipes/tiny/w4-ovfreeze.yaml")
FAST = ["data.max_train_tokens=4096", "data.valid_files=null", "train.micro_batch_size=4", "train.log_every=1", "train.warmup_steps=0"]


@pytest.fixture(autouse=True)
def _needs_fixture(monkeypatch):
    require_tiny()
    monkeypatch.chdir(REPO)


def train(out: Path, *overrides: str) -> int:
    return main(["train", TINY, f"output_dir={out}", *FAST, *overrides])


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and not p.is_symlink()  # wandb links logs/debug-core.log to its service's own log
    }


# -- numerical faults ---------------------------------------------------------------------------
class GradBomb(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def poison_kd_loss(monkeypatch, bad_calls, kind="nan"):
    """Make qat's KD loss non-finite (or its gradient infinite) on the given calls (1-based)."""
    real, calls = qat.train.loop.distill_loss, [0]

    def distill_loss(*a, **k):
        calls[0] += 1
        loss, kd, ce = real(*a, **k)
        if calls[0] in bad_calls:
            return (loss * float("nan") if kind == "nan" else GradBomb.apply(loss)), kd, ce
        return loss, kd, ce

    monkeypatch.setattr(qat.train.loop, "distill_loss", distill_loss)


def optimizer_steps(ckpt: Path) -> set[int]:
    opt = torch.load(ckpt / "optimizer.bin", weights_only=True)
    return {int(s["step"].item()) for s in opt["state"].values()}


@pytest.mark.parametrize("kind, reason", [("nan", "non-finite loss"), ("inf-grad", "non-finite gradient norm")])
def test_bad_steps_are_skipped(kind, reason, tmp_path, monkeypatch):
    poison_kd_loss(monkeypatch, {3, 5}, kind)
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train(out, "train.max_steps=6", "checkpoint.every=6", "train.max_bad_steps=2") == 0
    r = rows(out)
    assert [x["step"] for x in r] == [1, 2, 3, 4, 5, 6]
    assert [x.get("skipped") for x in r] == [None, None, reason, None, reason, None]
    assert [x.get("bad_steps") for x in r if "skipped" in x] == [1, 2]
    assert all(x["loss"] == x["loss"] and abs(x["loss"]) < 1e3 for x in r if "skipped" not in x)
    assert sum("step skipped" in str(w.message) for w in caught) == 2
    # no update on a skipped step: AdamW counted 4 steps, and every weight is finite
    assert optimizer_steps(out / "checkpoints" / "step-6") == {4}
    assert json.loads((out / "checkpoints" / "step-6" / "qat_state.json").read_text())["bad_steps"] == 2
    final = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())


def test_too_many_bad_steps_stop_the_run_with_the_checkpoint_intact(tmp_path, monkeypatch, capsys):
    poison_kd_loss(monkeypatch, set(range(5, 100)))  # from step 5 on, every loss is NaN
    out = tmp_path / "run"
    code = train(out, "train.max_steps=10", "checkpoint.every=2", "checkpoint.keep=3", "train.max_bad_steps=2")
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    assert "qat: training stopped: step 7: non-finite loss; 3 steps skipped, more than train.max_bad_steps=2" in err, err
    # steps 5 to 7 were skipped, so no checkpoint was written at step 6: step-4 is the last one,
    # its weights finite
    assert f"{out / 'checkpoints' / 'step-4'}) is intact" in err, err
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step-4"
    assert not (out / "final").exists() and not (out / "eval.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []
    w4 = load_file(str(out / "checkpoints" / "step-4" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in w4.values())
    assert optimizer_steps(out / "checkpoints" / "step-4") == {4}
    assert [x["step"] for x in rows(out) if "skipped" in x] == [5, 6, 7]


# -- disk faults --------------------------------------------------------------------------------
def test_checkpoint_write_failure_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    import accelerate

    real, calls = accelerate.Accelerator.save_state, [0]

    def save_state(self, output_dir=None, *a, **k):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint: some files written, then the disk is full
            real(self, output_dir, *a, **k)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(output_dir) / "optimizer.bin"))
        return real(self, output_dir, *a, **k)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    out = tmp_path / "run"
    code = train(out, "train.max_steps=6", "checkpoint.every=2", "checkpoint.keep=1")
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    assert "could not write checkpoint step-4" in err and f"no space left on {out / 'checkpoints'}" in err, err
    assert f"the previous checkpoint {out / 'checkpoints' / 'step-2'} is intact" in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]  # temp dir removed, step-2 kept
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step-2"
    assert not (out / "final").exists()
    # the run continues from it once there is space again
    monkeypatch.setattr(accelerate.Accelerator, "save_state", real)
    assert train(out, "train.max_steps=6", "checkpoint.every=2", "checkpoint.keep=1", "checkpoint.resume=auto") == 0
    assert "resumed from" in capsys.readouterr().out
    assert [x["step"] for x in rows(out)] == [1, 2, 3, 4, 5, 6]
    assert optimizer_steps(out / "checkpoints" / "step-6") == {6}


# -- security -----------------------------------------------------------------------------------
def test_trust_remote_code_off_unless_set_and_then_printed(tmp_path, monkeypatch, capsys):
    import transformers

    seen = []

    def record(cls, name):
        real = getattr(cls, name)

        def wrapper(*a, **k):
            seen.append((cls.__name__, name, k.get("trust_remote_code", "<absent>")))
            return real(*a, **k)

        monkeypatch.setattr(cls, name, wrapper)

    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        record(cls, "from_pretrained")
    record(transformers.AutoModelForCausalLM, "from_config")

    assert train(tmp_path / "default", "train.max_steps=0") == 0
    assert "model.trust_remote_code is true" not in capsys.readouterr().out
    loads = {(c, n) for c, n, _ in seen}
    assert {("AutoConfig", "from_pretrained"), ("AutoTokenizer", "from_pretrained"), ("AutoModelForCausalLM", "from_pretrained")} <= loads
    assert {v for _, _, v in seen} <= {False, "<absent>"}, seen  # absent = transformers' default, False
    seen.clear()
    assert train(tmp_path / "trusted", "train.max_steps=0", "model.trust_remote_code=true") == 0
    assert "model.trust_remote_code is true" in capsys.readouterr().out
    assert {v for c, n, v in seen if c != "AutoModelForCausalLM" or n != "from_pretrained" or v != "<absent>"} == {True}


class Payload:
    """Unpickling this runs code (creates a file): what a loader must never do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resume_unpickles_nothing_but_tensors(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train(out, "train.max_steps=2", "checkpoint.every=2") == 0
    ckpt = out / "checkpoints" / "step-2"
    assert {p.suffix for p in ckpt.iterdir()} <= {".safetensors", ".bin", ".pkl", ".json"}

    # a clean resume reads everything through safetensors or torch.load(weights_only=True)
    real_load, loads = torch.load, []

    def load(*a, **k):
        loads.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", load)
    resumed = tmp_path / "resumed"
    assert train(resumed, "train.max_steps=3", f"checkpoint.resume={ckpt}") == 0
    assert loads and all(w is True for w in loads), loads

    # a checkpoint whose optimizer / RNG files carry code: refused, the code never runs
    for victim in ("optimizer.bin", "random_states_0.pkl"):
        bad = tmp_path / f"bad-{victim}"
        shutil.copytree(ckpt, bad)
        marker = tmp_path / f"pwned-{victim}"
        torch.save({"state": Payload(marker)}, bad / victim)
        # the checksum refuses the changed file before anything reads it
        code = train(tmp_path / f"out-{victim}", "train.max_steps=3", f"checkpoint.resume={bad}")
        err = capsys.readouterr().err
        assert code == 1 and f"{victim} does not match its checksum" in err and not marker.exists(), err
        # an attacker who rewrites the checksum too meets torch.load(weights_only=True)
        state = json.loads((bad / "qat_state.json").read_text())
        state["files"] = file_hashes(bad)
        state["sha256"] = state_digest(state)
        (bad / "qat_state.json").write_text(json.dumps(state))
        code = train(tmp_path / f"out2-{victim}", "train.max_steps=3", f"checkpoint.resume={bad}")
        err = capsys.readouterr().err
        assert not marker.exists(), f"unpickling {victim} ran code"
        assert code == 1 and f"could not load checkpoint {bad}" in err and "Traceback" not in err, err  # the RNG state too


def test_a_run_writes_only_inside_its_output_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    # offline through the recipe: wandb's in-process settings keep the environment of its first use
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    repo_before = {p for p in REPO.rglob("*") if ".git" not in p.parts and "__pycache__" not in p.parts}
    first = work / "first"
    crafted = ["tracking.wandb_project=qat-tests", "tracking.mode=offline", "tracking.run_name=../../../escape-run",
               "tracking.tags=['../escape-tag']", "checkpoint.every=2"]
    assert train(first, "train.max_steps=2", *crafted) == 0
    first_files = digest(first)
    # a second run starting from the first one's checkpoint (outside its own output_dir)
    second = work / "second"
    assert train(second, "train.max_steps=3", *crafted, f"checkpoint.resume={first / 'checkpoints' / 'step-2'}") == 0
    assert sorted(p.name for p in work.iterdir()) == ["first", "second"]
    assert digest(first) == first_files  # read, never written
    assert list(tmp_path.iterdir()) == [work]
    assert not list(tmp_path.parent.glob("escape*"))
    repo_after = {p for p in REPO.rglob("*") if ".git" not in p.parts and "__pycache__" not in p.parts}
    assert repo_after == repo_before, repo_after ^ repo_before
    assert (second / "wandb").is_dir() and (second / "final" / "model.safetensors").is_file()


def test_wandb_key_is_written_nowhere(tmp_path, monkeypatch, capfd):
    pytest.importorskip("wandb")
    key = "qatsecret" + "0123456789abcdef" * 2
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    assert train(out, "train.max_steps=2", "checkpoint.every=2", "tracking.wandb_project=qat-tests", "tracking.mode=offline") == 0
    captured = capfd.readouterr()
    assert key not in captured.out and key not in captured.err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.parts[-2:] == ("final", "model.safetensors") for p in files)
    assert list((out / "wandb").glob("offline-run-*")), "wandb did not run (offline)"
    for p in files:
        assert key.encode() not in p.read_bytes(), f"the wandb key was written to {p}"
