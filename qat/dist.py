"""Helpers for code that runs on every process of a launch.

- ``rank_zero()``: whether this process is rank 0, from the launcher's environment (for messages
  printed before, or without, an Accelerator);
- ``from_main_process(value, accelerator)``: the main process's ``value`` on every process, so
  that work decided by looking at the disk (which shards are missing, which checkpoint verifies) is
  decided once, and the disk is read once;
- ``my_share(items, accelerator)``: this process's share of a work list the main process drew up
  (teacher-generated shards, teacher-cache shards);
- ``fsdp_on_cpu(accelerator)``: FSDP2 on CPU processes launched with an FSDP config, which
  Accelerate otherwise runs as plain DDP;
- ``wait_for_everyone(accelerator, what)``: a barrier that, past the process group's timeout
  (``train.collective_timeout_s``), says what the waiting rank was waiting for.
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


def my_share(items, accelerator=None) -> list:
    """Rank r's share ``items[r::world]`` of the main process's ``items`` (pass anything on the
    others): the list is decided once, so work that lands on disk meanwhile cannot shift the split."""
    items = from_main_process(items, accelerator)
    if accelerator is None:
        return list(items)
    return items[accelerator.process_index :: accelerator.num_processes]


def fsdp_on_cpu(accelerator) -> bool:
    """Honour an FSDP launch config on CPU processes; return whether it switched.

    ``accelerate launch`` with ``distributed_type: FSDP`` exports ``ACCELERATE_USE_FSDP=true`` and
    the ``FSDP_*`` settings, but Accelerate 1.x turns FSDP on only for accelerator devices: CPU
    processes fall back to ``MULTI_CPU`` (DDP over gloo) without a word. This switches the
    process-wide state to FSDP the way Accelerate does for a GPU launch (the same two state
    fields, the plugin built from the same environment), so ``prepare``, ``save_state``,
    ``get_state_dict`` and ``clip_grad_norm_`` then take Accelerate's own FSDP2 code. FSDP1 is
    left alone (it needs a device). Call it right after the ``Accelerator`` is made, before
    anything is prepared."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wanted or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    if os.environ.get("FSDP_VERSION", "1") != "2":
        return False
    state = AcceleratorState()
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState() re-reads it
    return True


class CollectiveTimeout(RuntimeError):
    """A rank waited past the process group's timeout; the message names what it waited for."""


def wait_for_everyone(accelerator, what: str) -> None:
    """``accelerator.wait_for_everyone()``. ``what``: what the other ranks are doing meanwhile
    (e.g. "the main process writing final/"), named if this rank waits past the timeout (gloo
    and NCCL raise a RuntimeError, or its subclass DistBackendError, saying "timed out")."""
    if accelerator is None:
        return
    try:
        accelerator.wait_for_everyone()
    except RuntimeError as e:
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        raise CollectiveTimeout(
            f"rank {accelerator.process_index} waited past the collective timeout for {what}; if that step is only slow "
            "at this model size, raise train.collective_timeout_s"
        ) from None
