"""The run directory: the one module that decides what qat may create, write and delete on disk.

Rules (every writer goes through them):

- **qat deletes only what it created.** A run directory carries a marker, ``.qat-run.json``
  (``{"kind": "train" | "ptq", ...}``), written when qat creates the run. ``--overwrite`` clears a
  directory only when it carries the marker of the same kind, and then only the files that kind of
  run writes (``RUN_FILES``); caches (``teacher-cache/``, ``generated-data/``) are kept. A directory
  without the marker that already holds an entry of one of those names (a user's own ``tokenizer/``
  or ``wandb/``) is refused, never adopted.
- **--overwrite never loses what it cannot replace:** the previous run's files are moved aside
  into ``.qat-replaced/`` (``Replacement``) and deleted only once the new run has something to
  stand in for them (its first checkpoint, or ``final/``); a new run that fails before that is
  removed and the previous one moved back.
- **The checks hold under the lock:** whether the directory already holds a run is asked again
  once the lock is taken (``create_run_dir``), so of two processes started on one new directory
  the second never writes over the first one's run.
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
import uuid
from pathlib import Path

from ..recipe import RecipeError

MARKER = ".qat-run.json"
LOCK = ".qat-run.lock"
# what each kind of run writes, and so what --overwrite may clear
RUN_FILES = {
    "train": ("recipe.yaml", "metrics.jsonl", "eval.json", "checkpoints", "final", "tokenizer", "wandb"),
    "ptq": ("recipe.yaml", "eval.json", "final"),
}
CACHES = ("teacher-cache", "generated-data")  # written inside the run by default; kept by --overwrite
REPLACED = ".qat-replaced"  # the run --overwrite replaces, until the new run can stand in for it
HOLDS_RUN = ("recipe.yaml", "metrics.jsonl", "final", "checkpoints", "eval.json", REPLACED)
NAME_MAX = 255  # the longest file name Linux file systems take


class DiskError(RuntimeError):
    """A write of the run failed on the disk (full, read-only, ...): one line, exit code 1."""

    def __init__(self, path: Path, e: BaseException, kept: str = ""):
        e = write_failure(e, path) or e
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            what = f"no space left on {path}"
        elif isinstance(e, OSError) and e.errno == errno.EROFS:
            what = f"cannot write {path}: the file system is read-only"
        else:
            what = f"cannot write {path} ({getattr(e, 'strerror', None) or e})"
        super().__init__(what + (f"; {kept}" if kept else ""))


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none)."""
    return (str(e).strip().splitlines() or [e.__class__.__name__])[0]


def write_failure(e: BaseException, path: Path | None = None) -> OSError | None:
    """``e`` as the ``OSError`` of a failed write, or None when it is not one. The libraries that
    write weights lose the error number on the way: safetensors raises ``SafetensorError``
    ("No space left on device (os error 28)"), torch's zip writer a ``RuntimeError`` ("file write
    failed"); for the latter the free space of ``path`` tells a full disk apart."""
    if isinstance(e, OSError):
        return e
    text = str(e)
    for code in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES):
        if f"os error {code})" in text or os.strerror(code) in text:
            return OSError(code, os.strerror(code))
    if type(e).__name__ == "SafetensorError" and ("IoError" in text or "I/O" in text):
        return OSError(errno.EIO, text.splitlines()[0] if text else "I/O error")
    if isinstance(e, RuntimeError) and ("file write failed" in text or "PytorchStreamWriter failed" in text):
        if path is not None and _free_bytes(path) < (1 << 20):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return OSError(errno.EIO, "the zip writer failed")
    return None


def _free_bytes(path: Path) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 1 << 62


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
    long = [part for part in resolved(out).parts if len(part.encode()) > NAME_MAX]
    if long:
        raise RecipeError(f"{key}: the path component {long[0][:40]}... is {len(long[0].encode())} bytes long; file systems take at most {NAME_MAX}")
    for f in (*RUN_FILES[kind], *CACHES, MARKER, LOCK, REPLACED):
        if (out / f).is_symlink():
            raise RecipeError(f"{key}: {out / f} is a symbolic link; qat writes only inside output_dir, remove it")
    if out.exists() and not out.is_dir():
        raise RecipeError(f"{key}: {out} exists and is not a directory")
    held = out.is_dir() and holds_run(out)
    m = marker(out) if out.is_dir() else None
    if out.is_dir() and not held and m is None:
        foreign = [f for f in RUN_FILES[kind] if (out / f).exists()]
        if foreign:
            raise RecipeError(f"{key}: {out} holds {', '.join(foreign)}, which qat did not create (no {MARKER}); a `qat {kind}` run "
                              "writes its own there: move them or choose another output_dir")
    if held and overwrite:
        if m is None:
            raise RecipeError(f"{key}: {out} holds files qat did not create (no {MARKER}); --overwrite clears only "
                              "qat's own runs: remove them yourself or choose another output_dir")
        if m["kind"] != kind:
            raise RecipeError(f"{key}: {out} holds a `qat {m['kind']}` run; --overwrite replaces only a `qat {kind}` run")
    return held


def create_run_dir(out: Path, kind: str, clear: bool, held_before: bool = False, key: str = "output_dir") -> "Replacement | None":
    """Make ``out`` a ``kind`` run directory, holding its lock: check it again (another process may
    have written a run since ``check_run_dir``), then create it with its marker or (``clear``) move
    the previous run of the same kind aside. Returns that ``Replacement``, or None.
    ``held_before``: what ``check_run_dir`` found, and the caller accepted."""
    held = check_run_dir(out, kind, clear, key)
    if held and not held_before and not clear:
        raise RecipeError(f"{key}: {out} received a run from another process while this one was getting ready; "
                          "nothing was written. Pass --overwrite to replace it, or choose another output_dir")
    replaced = None
    if clear and held:
        m = marker(out)
        if m is None or m["kind"] != kind:  # check_run_dir refused this already; never delete blindly
            raise RecipeError(f"{key}: {out} is not a `qat {kind}` run directory; refusing to clear it")
        replaced = Replacement(out, kind).move_aside()
    out.mkdir(parents=True, exist_ok=True)
    if marker(out) is None:
        write_json_atomic(out / MARKER, {"kind": kind, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                                         "run_id": uuid.uuid4().hex})
    return replaced


def _delete(p: Path) -> None:
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p)


class Replacement:
    """The files of the run ``--overwrite`` replaces, held in ``out/.qat-replaced/`` until the new
    run can stand in for them: ``commit`` deletes them, ``restore`` removes the new run's files
    and moves them back. A ``.qat-replaced/`` left by a killed process holds the last complete run
    and is kept: the files it would have been replaced with are the ones discarded."""

    def __init__(self, out: Path, kind: str):
        self.out, self.kind, self.aside = out, kind, out / REPLACED
        self.active = False

    def move_aside(self) -> "Replacement":
        if self.aside.is_symlink():
            raise RecipeError(f"output_dir: {self.aside} is a symbolic link; qat writes only inside output_dir, remove it")
        earlier = self.aside.is_dir()
        self.aside.mkdir(exist_ok=True)
        for f in RUN_FILES[self.kind]:
            p = self.out / f
            if p.exists() or p.is_symlink():
                if earlier:
                    _delete(p)  # an interrupted replacement: the complete run is the one already aside
                else:
                    os.replace(p, self.aside / f)
        fsync_dir(self.out)
        self.active = True
        return self

    def commit(self) -> None:
        """The new run can stand in for the old one: delete it."""
        if self.active:
            self.active = False
            shutil.rmtree(self.aside, ignore_errors=True)

    def restore(self) -> None:
        """The new run failed before it could stand in: remove it, put the old one back."""
        if not self.active:
            return
        self.active = False
        for f in RUN_FILES[self.kind]:
            if (self.aside / f).exists() or (self.aside / f).is_symlink():
                p = self.out / f
                if p.exists() or p.is_symlink():
                    _delete(p)
                os.replace(self.aside / f, p)
            elif (self.out / f).exists() or (self.out / f).is_symlink():
                _delete(self.out / f)
        shutil.rmtree(self.aside, ignore_errors=True)
        fsync_dir(self.out)


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

    @staticmethod
    def holder(out: Path) -> int | None:
        """The pid of the process that holds ``out``'s lock (a run still writing), else None."""
        import fcntl

        path = out / LOCK
        if path.is_symlink() or not path.is_file():
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            try:
                return int(os.read(fd, 32).decode().strip() or 0) or -1
            except ValueError:
                return -1
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

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


def stale_temp_dirs(parent: Path, prefix: str) -> list[Path]:
    """qat's own temporary directories ``<prefix><pid>`` under ``parent`` whose process is gone
    (a killed write): safe to delete, and nothing else is."""
    out = []
    for p in parent.glob(f"{prefix}*"):
        pid = p.name[len(prefix):]
        if not pid.isdigit() or p.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            out.append(p)
        except OSError:
            pass
    return out


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (before it is renamed into place)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            if os.path.islink(os.path.join(dirpath, name)):
                continue
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


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
