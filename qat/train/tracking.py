"""What a run reports: ``metrics.jsonl`` (always) and wandb through Accelerate's trackers (which
may fail without stopping the run), and the Accelerator that carries them."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import warnings
from pathlib import Path

import torch

from ..deps import available, hint
from ..dist import fsdp_on_cpu, rank_zero
from ..io.rundir import DiskError
from ..io.weights import weight_files
from ..recipe import Recipe, RecipeError


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class MetricsLog:
    """metrics.jsonl (always, main process) + the Accelerate trackers (wandb), which may fail."""

    def __init__(self, path: Path, accelerator, start_step: int):
        self.path, self.acc, self.tracker_ok = path, accelerator, bool(accelerator.log_with)
        if accelerator.is_main_process and path.exists():  # resume: drop rows past the checkpoint
            rows = [r for r in path.read_text().splitlines() if _row_step(r) <= start_step]
            tmp = path.with_name(path.name + ".tmp")  # a kill here must not lose the kept rows
            tmp.write_text("".join(r + "\n" for r in rows))
            os.replace(tmp, path)

    def log(self, row: dict) -> None:
        if not self.acc.is_main_process:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise DiskError(self.path, e, f"the checkpoints in {self.path.parent / 'checkpoints'} are intact") from None
        if self.tracker_ok:
            try:
                self.acc.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=row["step"])
            except Exception as e:  # tracking must never stop training
                warnings.warn(f"wandb logging failed, continuing without it: {e}")
                self.tracker_ok = False


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a blank or torn one (a run killed mid-write)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def init_tracking(recipe: Recipe, accelerator, out: Path) -> None:
    tr = recipe.tracking
    if not accelerator.log_with:
        return
    wandb_kw = {"name": tr.run_name, "tags": tr.tags, "dir": str(out), "entity": tr.entity}
    if "WANDB_MODE" not in os.environ:  # the environment wins (e.g. WANDB_MODE=offline on a cluster)
        wandb_kw["mode"] = tr.mode
    try:
        accelerator.init_trackers(tr.wandb_project, config=recipe.to_dict(), init_kwargs={"wandb": wandb_kw})
    except Exception as e:
        warnings.warn(f"wandb could not start ({e.__class__.__name__}: {e}); continuing with metrics.jsonl only")
        accelerator.log_with = []
        accelerator.trackers = []


def resolve_precision(recipe: Recipe) -> str:
    """The run's mixed precision, from one source: ``train.mixed_precision``, or (null) the launch
    configuration's (``accelerate launch`` exports ``ACCELERATE_MIXED_PRECISION``), else ``no``.
    Set in both and different: ``RecipeError`` naming both. Written into the recipe, so
    ``recipe.yaml`` says what the run used."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    given = recipe.train.mixed_precision
    if given is not None and launched is not None and launched != given:
        raise RecipeError(f"train.mixed_precision: the recipe says {given!r} and the launch configuration (accelerate launch "
                          f"--mixed_precision / its config file) says {launched!r}; set it in one place (train.mixed_precision: null "
                          "takes the launch configuration's)")
    recipe.train.mixed_precision = given or launched or "no"
    return recipe.train.mixed_precision


def collective_timeout(recipe: Recipe) -> int:
    """``train.collective_timeout_s``, or derived from the model's size: the steps only the main
    process does (reading the student and teacher that it then broadcasts, writing final/) read
    or write about the checkpoint's bytes a few times; 1800 s plus 1 s per 10 MB of
    ``model.path``'s weight files (57 min at 8B in bf16, 4 h 23 at 70B) covers them on a slow
    disk. A hub id not downloaded yet, or a model from scratch: 1800 s."""
    if recipe.train.collective_timeout_s is not None:
        return recipe.train.collective_timeout_s
    path = Path(recipe.model.path) if recipe.model.path else None
    try:
        size = sum(f.stat().st_size for f in weight_files(path) if f.is_file()) if path is not None and path.is_dir() else 0
    except ValueError:  # an unreadable index: check_sources names it
        size = 0
    return 1800 + size // 10_000_000


def make_accelerator(recipe: Recipe, out: Path):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    resolve_precision(recipe)
    tr = recipe.tracking
    use_wandb = tr.wandb_project is not None and tr.mode != "disabled" and available("wandb")
    if tr.wandb_project is not None and tr.mode != "disabled" and not use_wandb and rank_zero():
        print(f"qat: {hint('wandb', 'tracking.wandb_project')}; logging to metrics.jsonl only", file=sys.stderr)
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.grad_accum,
        log_with="wandb" if use_wandb else None,
        project_dir=str(out),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout(recipe)))],
    )
    fsdp_on_cpu(accelerator)  # an FSDP launch config on CPU processes: FSDP2, not a silent DDP
    return accelerator
