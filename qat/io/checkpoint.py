"""Checkpoints: atomic writes through ``accelerator.save_state``, newest-complete lookup, pruning.

A checkpoint is written to ``checkpoints/.tmp-step-N``, completed with a ``qat_state.json``
(step, data position), and only then renamed to ``checkpoints/step-N``. A directory without that
name and marker (a write that was killed, or failed for lack of disk) is never taken as the
latest; the previous checkpoints stay untouched until the new one is complete. A failed write
raises ``CheckpointError`` (incomplete files removed, the previous checkpoint named as intact);
old checkpoints are renamed out of the way before they are deleted.

Trust: ``qat_state.json`` also lists the sha256 of every other file of the checkpoint (written
last, atomically), and carries the sha256 of its own content, so an edited step or file list is
found too. ``usable_checkpoint`` re-hashes them before a resume and falls back to the
newest checkpoint that verifies, saying which one was passed over and why (a flipped byte, a
truncated or missing file, an unreadable state, a step beyond the run). Pruning never deletes
the checkpoint the caller protects (the last one written before the first non-finite step).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from ..dist import wait_for_everyone
from .rundir import DiskError, first_line, fsync_dir, fsync_tree, write_failure, write_json_atomic

STATE_FILE = "qat_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-step-"
_DEL_PREFIX = ".del-"
STALE_PREFIX = "stale-step-"  # newer checkpoints set aside by a resume from an older one


def state_digest(state: dict) -> str:
    """sha256 of a ``qat_state.json`` without its own ``sha256`` entry (canonical JSON)."""
    body = {k: v for k, v in state.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. no space left); the earlier ones are intact."""


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and (p / STATE_FILE).is_file():  # a link leads out of the run
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1][1] if dirs else None


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


def file_hashes(ckpt: Path) -> dict[str, str]:
    """sha256 of every file under ``ckpt`` but the state file, by relative path."""
    out = {}
    for f in sorted(ckpt.rglob("*")):
        if f.is_file() and f.name != STATE_FILE:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out[str(f.relative_to(ckpt))] = h.hexdigest()
    return out


def checkpoint_problem(ckpt: Path, max_steps: int | None = None) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or None when it verifies."""
    try:
        state = read_state(ckpt)
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({e.__class__.__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool) or state["step"] < 0:
        return f"{STATE_FILE} has no valid step"
    if "sha256" in state and state["sha256"] != state_digest(state):
        return f"{STATE_FILE} does not match its checksum (edited or damaged)"
    if max_steps is not None and state["step"] > max_steps:
        return f"its step {state['step']} is beyond the run's {max_steps} steps"
    want = state.get("files")
    if want is None:
        return None  # written before checksums existed: nothing to verify against
    if not isinstance(want, dict):
        return f"{STATE_FILE} has no valid file list"
    have = file_hashes(ckpt)
    for name, digest in want.items():
        if name not in have:
            return f"{name} is missing"
        if have[name] != digest:
            return f"{name} does not match its checksum"
    return None


def usable_checkpoint(root: Path, explicit: Path | None = None, max_steps: int | None = None) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from: ``explicit`` if it verifies (else ``CheckpointError``), or
    the newest one under ``root`` that verifies. Returns it with one line per checkpoint passed
    over. ``CheckpointError`` when checkpoints exist but none verifies (nothing is deleted)."""
    if explicit is not None:
        why = checkpoint_problem(explicit, max_steps)
        if why:
            raise CheckpointError(f"checkpoint.resume: {explicit} cannot be resumed from: {why}")
        return explicit, []
    skipped = []
    for _, ckpt in reversed(checkpoint_dirs(root)):
        why = checkpoint_problem(ckpt, max_steps)
        if why is None:
            return ckpt, skipped
        skipped.append(f"passed over {ckpt.name}: {why}")
    if skipped:
        raise CheckpointError(f"no checkpoint under {root} can be resumed from ({'; '.join(skipped)}); "
                              "remove the checkpoints/ directory to start over")
    return None, []

def save_checkpoint(accelerator, root: Path, step: int, state: dict, keep: int, protect: Path | None = None) -> Path:
    """Write ``root/step-<step>`` atomically on every process (with the checksums of its files),
    then prune to the newest ``keep``, never deleting ``protect``."""
    final = root / f"step-{step}"
    tmp = root / f"{_TMP_PREFIX}{step}"
    previous = latest_checkpoint(root)
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            for stale in [*root.glob(f"{_TMP_PREFIX}*"), *root.glob(f"{_DEL_PREFIX}*")]:  # left by a killed run
                _rm(stale)
        wait_for_everyone(accelerator, f"the main process preparing checkpoint step-{step}")
        accelerator.save_state(str(tmp), safe_serialization=True)
        wait_for_everyone(accelerator, f"every process writing its part of checkpoint step-{step}")
        if accelerator.is_main_process:
            doc = {"step": step, **state, "files": file_hashes(tmp)}
            write_json_atomic(tmp / STATE_FILE, {**doc, "sha256": state_digest(doc)})
            fsync_tree(tmp)  # on disk before it is renamed into place and older ones are deleted
            if final.exists() or final.is_symlink():  # a checkpoint of the same step (e.g. re-run), or a link: replace it
                _remove(final)
            os.replace(tmp, final)
            fsync_dir(root)
    except BaseException as e:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: as they are
            raise
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        why = str(DiskError(root, e)) if write_failure(e, root) is not None else f"{e.__class__.__name__}: {first_line(e)}"
        raise CheckpointError(
            f"could not write checkpoint step-{step} in {root} ({why}); "
            f"the incomplete files were removed and {kept}"
        ) from e
    wait_for_everyone(accelerator, f"the main process checksumming and renaming checkpoint step-{step}")
    if accelerator.is_main_process:  # among this run's checkpoints: none newer than the one just written
        for _, old in [(s, p) for s, p in checkpoint_dirs(root) if s <= step][:-keep]:
            if protect is None or old.resolve() != protect.resolve():
                _remove(old)
    return final


def set_aside_newer(root: Path, step: int) -> list[str]:
    """Rename the checkpoints newer than ``step`` (a resume from an older one: they are not this
    continuation's) to ``stale-step-N``, kept for the user to inspect or delete; never deleted,
    never taken as the latest, never pruned in place of the run's own. One line per checkpoint."""
    lines = []
    if not root.is_dir():
        return lines
    for p in sorted(root.iterdir()):
        m = _STEP_DIR.match(p.name)
        if m and int(m.group(1)) > step and not p.is_symlink():
            dest = root / f"{STALE_PREFIX}{m.group(1)}"
            n = 1
            while dest.exists():
                dest, n = root / f"{STALE_PREFIX}{m.group(1)}.{n}", n + 1
            os.replace(p, dest)
            lines.append(f"set aside {p.name} as {dest.name}: newer than the checkpoint resumed from")
    if lines:
        fsync_dir(root)
    return lines


def _remove(ckpt: Path) -> None:
    """Take a checkpoint out of the complete set in one rename, then delete it (a kill during a
    plain rmtree could leave a half-deleted directory that still looks complete)."""
    doomed = ckpt.with_name(f"{_DEL_PREFIX}{ckpt.name}")
    if doomed.exists() or doomed.is_symlink():
        _rm(doomed)
    os.replace(ckpt, doomed)
    _rm(doomed)


def _rm(p: Path) -> None:
    """Delete a directory qat wrote, or a link planted in its place (never what it points to)."""
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)
