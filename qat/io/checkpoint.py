"""Checkpoints: atomic writes through ``accelerator.save_state``, newest-complete lookup, pruning.

A checkpoint is written to ``checkpoints/.tmp-step-N``, completed with a ``qat_state.json``
(step, data position), and only then renamed to ``checkpoints/step-N``. A directory without that
name and marker (a write that was killed, or failed for lack of disk) is never taken as the
latest; the previous checkpoints stay untouched until the new one is complete. A failed write
raises ``CheckpointError`` (incomplete files removed, the previous checkpoint named as intact);
old checkpoints are renamed out of the way before they are deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .rundir import fsync_dir, write_json_atomic

STATE_FILE = "qat_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-step-"
_DEL_PREFIX = ".del-"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. no space left); the earlier ones are intact."""


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1][1] if dirs else None


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


def save_checkpoint(accelerator, root: Path, step: int, state: dict, keep: int) -> Path:
    """Write ``root/step-<step>`` atomically on every process, then prune to the newest ``keep``."""
    final = root / f"step-{step}"
    tmp = root / f"{_TMP_PREFIX}{step}"
    previous = latest_checkpoint(root)
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            for stale in [*root.glob(f"{_TMP_PREFIX}*"), *root.glob(f"{_DEL_PREFIX}*")]:  # left by a killed run
                shutil.rmtree(stale)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(tmp / STATE_FILE, {"step": step, **state})
            if final.exists():  # a complete checkpoint of the same step (e.g. re-run): replace it
                _remove(final)
            os.replace(tmp, final)
            fsync_dir(root)
    except BaseException as e:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: as they are
            raise
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        raise CheckpointError(
            f"could not write checkpoint step-{step} in {root} ({e.__class__.__name__}: {e}); "
            f"the incomplete files were removed and {kept}"
        ) from e
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for _, old in checkpoint_dirs(root)[:-keep]:
            _remove(old)
    return final


def _remove(ckpt: Path) -> None:
    """Take a checkpoint out of the complete set in one rename, then delete it (a kill during a
    plain rmtree could leave a half-deleted directory that still looks complete)."""
    doomed = ckpt.with_name(f"{_DEL_PREFIX}{ckpt.name}")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(ckpt, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
