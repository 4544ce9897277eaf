"""Two helpers for code that runs on every process of a launch.

- ``rank_zero()``: whether this process is rank 0, from the launcher's environment (for messages
  printed before, or without, an Accelerator);
- ``from_main_process(value, accelerator)``: the main process's ``value`` on every process, so
  that work decided by looking at the disk (which shards are missing, which checkpoint verifies) is
  decided once, and the disk is read once.
"""

from __future__ import annotations

import os


def rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def from_main_process(value, accelerator=None):
    """``value`` as the main process computed it (pass anything, e.g. None, on the others)."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value if accelerator.is_main_process else None])[0]
