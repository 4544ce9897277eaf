"""Checkpoints: atomic writes through ``accelerator.save_state``, newest-complete lookup, pruning.

A checkpoint is written to ``checkpoints/.tmp-step-N``, completed with a ``qat_state.json``
(step, data position), and only then renamed to ``checkpoints/step-N``. A directory without that
name and marker (a write that was killed, or failed for lack of disk) is never taken as the
latest; the previous checkpoints stay untouched until the new one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STATE_FILE = "qat_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_json_atomic(tmp / STATE_FILE, {"step": step, **state})
            if final.exists():  # a complete checkpoint of the same step (e.g. re-run): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
    except BaseException:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for _, old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
