"""The run directory rules (``qat/io/rundir.py``): qat deletes only what it created, never writes
outside the run, and one process at a time owns a run directory. No fixtures needed: the
from-scratch quickstart recipe, shrunk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PRETRAIN, SCRATCH_SMALL  # noqa: E402

from qat.cli import main
from qat.io.rundir import MARKER, RunLock, forbidden, marker
from qat.recipe import RecipeError

REPO = Path(__file__).resolve().parents[1]
SMALL = [*SCRATCH_SMALL, "train.max_steps=1", "train.log_every=1"]


def train(out: Path, *extra: str) -> int:
    return main(["train", PRETRAIN, f"output_dir={out}", *SMALL, *extra])


def listing(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train(out) == 0
    return out


@pytest.fixture(scope="module")
def quant_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "w4"
    assert train(out, "quant={bits: 4, group_size: 32}") == 0
    return out


def test_a_run_carries_its_marker(done_run):
    assert marker(done_run)["kind"] == "train"


def test_overwrite_clears_only_what_qat_wrote(done_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(done_run, out)
    (out / "notes.txt").write_text("mine")
    (out / "export-fake").mkdir()
    (out / "export-fake" / "x").write_text("an export is not a run file")
    assert train(out) == 2  # without --overwrite: refused
    assert "already holds a run" in capsys.readouterr().err
    assert train(out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "export-fake" / "x").exists()
    assert (out / "final" / "config.json").exists()


@pytest.mark.parametrize("where", ["home", "cwd", "parent-of-cwd", "root"])
def test_never_a_directory_that_holds_more_than_runs(where, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    work = home / "work" / "project"
    work.mkdir(parents=True)
    (home / "thesis.tex").write_text("years of work")
    (home / "final").mkdir()
    (home / "final" / "keep.txt").write_text("not qat's")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    out = {"home": home, "cwd": work, "parent-of-cwd": work.parent, "root": Path("/")}[where]
    before = listing(home)
    assert train(out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "a run needs a directory of its own" in err and "Traceback" not in err, err
    assert listing(home) == before


def test_overwrite_refuses_what_qat_did_not_create(tmp_path, capsys):
    out = tmp_path / "someone-elses"
    (out / "final").mkdir(parents=True)
    (out / "final" / "thesis.tex").write_text("x")
    (out / "recipe.yaml").write_text("not a qat recipe")
    before = listing(out)
    assert train(out, "--overwrite") == 2
    assert f"no {MARKER}" in capsys.readouterr().err
    assert listing(out) == before


def test_overwrite_refuses_a_run_of_another_kind(tmp_path, capsys):
    out = tmp_path / "ptq-run"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"kind": "ptq"}))
    (out / "eval.json").write_text("{}")
    assert train(out, "--overwrite") == 2
    assert "holds a `qat ptq` run" in capsys.readouterr().err
    assert (out / "eval.json").exists()


def test_export_never_overwrites_the_run_or_a_stranger(quant_run, tmp_path, capsys):
    done_run = quant_run
    before = listing(done_run)
    assert main(["export", str(done_run), "--format", "fake", "--out", str(done_run), "--overwrite"]) == 2
    assert "is the run directory" in capsys.readouterr().err
    assert main(["export", str(done_run), "--format", "fake", "--out", str(done_run.parent), "--overwrite"]) == 2
    assert "above the run" in capsys.readouterr().err
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "data.bin").write_text("x")
    assert main(["export", str(done_run), "--format", "fake", "--out", str(stranger), "--overwrite"]) == 2
    assert "is not a qat export" in capsys.readouterr().err
    assert (stranger / "data.bin").exists() and listing(done_run) == before


def test_a_symlinked_run_file_is_refused(tmp_path, capsys):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / MARKER).symlink_to(elsewhere / "m.json")
    assert train(out) == 2
    assert "symbolic link" in capsys.readouterr().err and list(elsewhere.iterdir()) == []


def test_one_process_per_run_directory(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    with RunLock(out):
        assert train(out, "checkpoint.resume=auto") == 2
        assert "in use by another qat process" in capsys.readouterr().err
        with pytest.raises(RecipeError, match="in use"):
            RunLock(out).acquire()
    RunLock(out).acquire().release()  # released with the first


def test_a_killed_process_releases_its_lock(tmp_path):
    out = tmp_path / "crashed"
    out.mkdir()
    code = f"import os; from pathlib import Path; from qat.io.rundir import RunLock; RunLock(Path({str(out)!r})).acquire(); os._exit(9)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 9
    RunLock(out).acquire().release()  # the kernel dropped the dead process's lock


def test_forbidden_names_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert forbidden(tmp_path) == "the home directory"
    assert forbidden("~") == "the home directory"
    assert forbidden(tmp_path / "runs" / "x") is None
    assert "a parent of" in forbidden(tmp_path.parent)
    assert forbidden(os.sep) is not None


def test_final_is_written_atomically(tmp_path):
    from qat.io.final import writing_final

    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("old")
    with pytest.raises(OSError, match="No space left"):
        with writing_final(final) as tmp:
            (tmp / "config.json").write_text("half of the new")
            raise OSError(28, "No space left on device")
    assert (final / "config.json").read_text() == "old"  # the previous final/ is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # nothing partial left beside it
    (tmp_path / ".final.tmp-999999").mkdir()  # left by a killed writer
    with writing_final(final) as tmp:
        (tmp / "config.json").write_text("new")
    assert (final / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_links_planted_in_a_run_are_not_followed(done_run, tmp_path, capsys):
    """final/ is replaced as a whole (a link inside it is not written through), and a cache
    directory that is a link is refused before anything is written."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(done_run, out)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("precious")
    (out / "final" / "config.json").unlink()
    (out / "final" / "config.json").symlink_to(elsewhere)
    assert train(out, "--overwrite") == 0
    assert elsewhere.read_text() == "precious" and not (out / "final" / "config.json").is_symlink()
    (tmp_path / "cache-elsewhere").mkdir()
    (out / "teacher-cache").symlink_to(tmp_path / "cache-elsewhere")
    assert train(out, "--overwrite") == 2
    assert "teacher-cache is a symbolic link" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_keeps_what_was_there(done_run, tmp_path, monkeypatch, capsys):
    import errno
    import shutil

    import qat.io.final
    import qat.train.tracking

    out = tmp_path / "run"
    shutil.copytree(done_run, out)
    before = (out / "final" / "model.safetensors").read_bytes()

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qat.train.lora, "save_final", no_space)  # final/: the previous one stays whole
    assert train(out, "checkpoint.resume=auto", "train.max_steps=2") == 1
    err = capsys.readouterr().err
    assert f"no space left on {out / 'final'}" in err and "Traceback" not in err, err
    assert (out / "final" / "model.safetensors").read_bytes() == before
    assert not list(out.glob(".final.*"))
    monkeypatch.undo()

    real_open = open

    def full_metrics(path, *a, **k):
        if str(path).endswith("metrics.jsonl") and a and a[0] == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *a, **k)

    monkeypatch.setattr(qat.train.tracking, "open", full_metrics, raising=False)
    assert train(out, "checkpoint.resume=auto", "train.max_steps=3") == 1
    err = capsys.readouterr().err
    assert f"no space left on {out / 'metrics.jsonl'}" in err and "Traceback" not in err, err
