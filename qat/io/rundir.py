"""The run directory: the one module that decides what qat may create, write and delete on disk.

Rules (every writer goes through them):

- **qat deletes only what it created.** A run directory carries a marker, ``.qat-run.json``
  (``{"kind": "train" | "ptq", ...}``), written when qat creates the run. ``--overwrite`` clears a
  directory only when it carries the marker of the same kind, and then only the files that kind of
  run writes (``RUN_FILES``); caches (``teacher-cache/``, ``generated-data/``) are kept.
- **Never a directory that holds more than runs:** ``/``, the home directory, the current
  directory and any of their parents are refused as a run directory (checked on the resolved path).
- **Nothing leaves the run directory:** a run file, cache directory, marker or lock that is a
  symbolic link is refused before anything is written; ``final/`` and checkpoints are written
  into fresh temporary directories and renamed, so a link planted inside them is never written through.
- **One process per run directory:** ``RunLock`` holds an OS file lock (``fcntl.flock``, released
  by the kernel when the process dies) for as long as the run writes; a second process exits 2.
- **Atomic writes:** ``write_text_atomic`` / ``write_json_atomic`` write a temporary file in the
  same directory, fsync it and rename it over the target.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
from pathlib import Path

from ..recipe import RecipeError

MARKER = ".qat-run.json"
LOCK = ".qat-run.lock"
# what each kind of run writes, and so what --overwrite may clear
RUN_FILES = {
    "train": ("recipe.yaml", "metrics.jsonl", "eval.json", "checkpoints", "final", "tokenizer", "wandb"),
    "ptq": ("recipe.yaml", "eval.json", "final"),
}
HOLDS_RUN = ("recipe.yaml", "metrics.jsonl", "final", "checkpoints", "eval.json")
CACHES = ("teacher-cache", "generated-data")  # written inside the run by default; kept by --overwrite


class DiskError(RuntimeError):
    """A write of the run failed on the disk (full, read-only, ...): one line, exit code 1."""

    def __init__(self, path: Path, e: OSError, kept: str = ""):
        what = f"no space left on {path}" if e.errno == errno.ENOSPC else f"cannot write {path} ({e.strerror or e})"
        super().__init__(what + (f"; {kept}" if kept else ""))


def resolved(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` expanded, absolute, symbolic links resolved (the directory need not exist)."""
    return Path(os.path.expanduser(str(path))).resolve()


def forbidden(path: str | os.PathLike) -> str | None:
    """Why ``path`` can never be a run directory (``/``, the home directory, the current
    directory or one of their parents), else None."""
    p = resolved(path)
    for what, d in (("the filesystem root", Path("/")), ("the home directory", Path.home()), ("the current directory", Path.cwd())):
        d = d.resolve()
        if p == d or p in d.parents:
            return f"{what}" if p == d else f"a parent of {what} ({d})"
    return None


def marker(out: Path) -> dict | None:
    """The run's marker (``{"kind", "created", ...}``), or None when qat did not create ``out``."""
    path = out / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("kind"), str) else None


def holds_run(out: Path) -> bool:
    return any((out / f).exists() for f in HOLDS_RUN)


def check_run_dir(out: Path, kind: str, overwrite: bool, key: str = "output_dir") -> bool:
    """Everything that must hold before a ``kind`` run writes into ``out``; writes nothing.
    Returns whether ``out`` already holds a run. ``overwrite``: the caller will clear it."""
    why = forbidden(out)
    if why is not None:
        raise RecipeError(f"{key}: {out} is {why}; a run needs a directory of its own (e.g. {out}/runs/NAME)")
    for f in (*RUN_FILES[kind], *CACHES, MARKER, LOCK):
        if (out / f).is_symlink():
            raise RecipeError(f"{key}: {out / f} is a symbolic link; qat writes only inside output_dir, remove it")
    if out.exists() and not out.is_dir():
        raise RecipeError(f"{key}: {out} exists and is not a directory")
    held = out.is_dir() and holds_run(out)
    if held and overwrite:
        m = marker(out)
        if m is None:
            raise RecipeError(f"{key}: {out} holds files qat did not create (no {MARKER}); --overwrite clears only "
                              "qat's own runs: remove them yourself or choose another output_dir")
        if m["kind"] != kind:
            raise RecipeError(f"{key}: {out} holds a `qat {m['kind']}` run; --overwrite replaces only a `qat {kind}` run")
    return held


def create_run_dir(out: Path, kind: str, clear: bool) -> None:
    """Make ``out`` a ``kind`` run directory: create it with its marker, or (``clear``, after
    ``check_run_dir``) delete the files of the previous run of the same kind first."""
    if clear and out.is_dir() and holds_run(out):
        m = marker(out)
        if m is None or m["kind"] != kind:  # check_run_dir refused this already; never delete blindly
            raise RecipeError(f"output_dir: {out} is not a `qat {kind}` run directory; refusing to clear it")
        for f in RUN_FILES[kind]:
            p = out / f
            if p.is_symlink():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if marker(out) is None:
        write_json_atomic(out / MARKER, {"kind": kind, "created": datetime.datetime.now().isoformat(timespec="seconds")})


class RunLock:
    """An exclusive, non-blocking OS lock on ``out/.qat-run.lock`` for the life of a run."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            self.fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RecipeError(f"output_dir: {self.path.parent} is in use by another qat process; wait for it or choose another output_dir") from None
            raise
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))
