"""The QAT loop on Accelerate: ``train()`` is a short sequence of named steps (start the
processes, prepare the data and the run directory, build the models, resume, train, write final/,
evaluate), each a function of the shared ``Run`` state that can be read and tested alone.

Per optimizer step and micro-batch: teacher forward (no grad; or its top-k read from the
teacher cache), student forward through the fake-quant layers, loss = kd_weight * KD +
ce_weight * CE over the shifted real tokens (``qat.distill``, chunked over tokens),
backward (Accelerate: DDP / FSDP, mixed precision, gradient accumulation), clip, step.

Data order is a pure function of (seed, step): every epoch is a seeded permutation of the
blocks; the global micro-batch k takes the next ``micro_batch_size * num_processes`` indices and
rank r its own slice. A run resumed from step N therefore sees exactly the batches an
uninterrupted run sees, and 1 process with batch 2B sees the same global batches as 2 with B.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.generate import build_run_datasets, generate_cached
from ..data.plans import BatchPlan, batch_of, blocks_used, qat_train_tokens
from ..data.setup import check_positions, tokenizer_for
from ..deps import require
from ..dist import from_main_process, rank_zero, wait_for_everyone
from ..distill import distill_loss
from ..distill.teacher_cache import TeacherCache
from ..distill.teacher_cache import check as check_teacher_cache
from ..distill.teacher_cache import precompute as precompute_teacher_cache
from ..evaluate.perplexity import perplexity
from ..io.checkpoint import CheckpointError, latest_checkpoint, read_state, save_checkpoint, set_aside_newer, usable_checkpoint
from ..io.final import final_dtype, has_adapter, writing_final
from ..io.models import DTYPES, check_sources, empty_model_dir, first_line, load_model_dir, load_models, model_config, student_skeleton
from ..io.rundir import DiskError, Replacement, RunLock, check_run_dir, create_run_dir, marker, write_failure, write_json_atomic, write_text_atomic
from ..policy import build_student_quant, dry_run_quant, freeze_due, freeze_layers, quant_plan, schedule_transitions
from ..policy.search import clip_ratios
from ..quant.apply import set_fake_quant
from ..recipe import Recipe, RecipeError
from .identity import compare as compare_identity
from .identity import run_identity
from .lora import apply_lora, init_calibration, save_lora_final
from .optim import build_optimizer, lr_at
from .tracking import MetricsLog, init_tracking, make_accelerator, peak_memory_gb


# -- setup ---------------------------------------------------------------------------------
def check_output_dir(recipe: Recipe, overwrite: bool) -> tuple[Path | None, bool]:
    """Refuse to clobber another run or anything qat did not create (``qat.io.rundir``); return
    the checkpoint to resume from, if any, and whether ``output_dir`` holds a run. Writes nothing.
    A checkpoint from elsewhere only starts a run in a directory that holds none (or with --overwrite). --overwrite starts over: it never
    resumes the run it replaces (``checkpoint.resume=auto`` is set aside, with a line saying so)."""
    out = Path(recipe.output_dir)
    resume = recipe.checkpoint.resume
    if overwrite and resume == "auto":
        if rank_zero() and (out / "checkpoints").is_dir():
            print("checkpoint.resume=auto: not resuming, --overwrite replaces the run in output_dir")
        resume = None
    held = check_run_dir(out, "train", overwrite and resume is None)
    if resume == "auto":  # verified (and an older one taken if need be) in ``resume``
        return latest_checkpoint(out / "checkpoints"), held
    if resume is not None:
        ckpt = Path(resume).resolve()
        if held and (out / "checkpoints").resolve() in ckpt.parents and overwrite:
            raise RecipeError(f"checkpoint.resume: {resume} is a checkpoint of the run that --overwrite replaces; "
                              "drop --overwrite to continue that run, or checkpoint.resume to start over")
        if held and (out / "checkpoints").resolve() not in ckpt.parents:
            if not overwrite:
                raise RecipeError(
                    f"checkpoint.resume: {resume} is not a checkpoint of the run in output_dir {out}; "
                    "pass --overwrite to replace that run, or choose another output_dir"
                )
            check_run_dir(out, "train", overwrite=True)  # replacing it: it must be a qat train run
        return Path(resume), held
    if not overwrite and held:
        raise RecipeError(
            f"output_dir: {out} already holds a run; pass --overwrite to replace it or checkpoint.resume=auto to continue it"
        )
    return None, held


def start_run_dir(run: "Run", clear: bool, resuming: bool, held: bool) -> None:
    """Lock the run directory and create it (checked again under the lock; after --overwrite the
    old run's files moved aside) with a trained tokenizer and, for a new run, the resolved recipe
    (a resumed run writes it once the checkpoint is known to belong to it)."""
    recipe, out = run.recipe, run.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        run.lock = RunLock(out).acquire()
    except OSError as e:
        raise DiskError(out, e, "nothing was written") from None
    try:
        run.replaced = create_run_dir(out, "train", clear, held_before=held)
        if not resuming:
            write_text_atomic(out / "recipe.yaml", recipe.to_yaml())
        if recipe.tokenizer_path is None and not (out / "tokenizer" / "tokenizer.json").exists():
            run.tokenizer.save_pretrained(out / "tokenizer")
    except OSError as e:
        raise DiskError(out, e, "nothing of an earlier run was removed") from None


class LaunchError(RuntimeError):
    """The processes were launched in a way that cannot train (the CLI: one line, exit code 2)."""


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT or SIGTERM (``signum``), after a checkpoint at the step boundary
    when the recipe checkpoints (the CLI: where to resume, exit code 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_requests(main: bool):
    """While the loop runs, SIGINT (Ctrl-C) and SIGTERM (what a scheduler sends before it
    preempts a job) ask it to stop at the next step boundary: yields the list the signal numbers
    land in. A second signal stops at once. A signal that is ignored (a background job's SIGINT)
    stays ignored."""
    got: list[int] = []

    def handler(signum, frame):
        if got:  # the second one: at once
            raise Interrupted(signum)
        got.append(signum)
        if main:
            print(f"\nqat: {signal.Signals(signum).name} received: stopping after this step (with a checkpoint if the recipe "
                  "checkpoints); send it again to stop at once", file=sys.stderr, flush=True)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) is not signal.SIG_IGN:
                previous[s] = signal.signal(s, handler)
    try:
        yield got
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_signal(run: "Run", got: list[int]) -> int:
    """The signal that asks every process to stop (0: none), the same answer on all of them."""
    mine = got[0] if got else 0
    if run.accelerator.num_processes == 1:
        return mine
    return int(run.accelerator.gather(torch.tensor([mine], device=run.accelerator.device)).max().item())


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps); the message says why."""


def nonfinite_step(step_sums: torch.Tensor, grad_norm: float | None, accelerator) -> str | None:
    """Why this optimizer step must be skipped, or None. The same answer on every process: the
    loss check is all-reduced, the gradient norm is already global. Under fp16 an overflowing
    gradient is the GradScaler's to skip (it lowers the scale), not ours. Under DeepSpeed the
    engine steps inside ``backward``: a bad step is counted (and stops the run) but not undone."""
    bad_loss = accelerator.reduce((~torch.isfinite(step_sums)).any().float().reshape(1), reduction="sum")
    if bad_loss.item() > 0:
        return "non-finite loss"
    if grad_norm is not None and not math.isfinite(grad_norm) and accelerator.scaler is None:
        return "non-finite gradient norm"
    return None


def clip_parameters(run: "Run") -> list:
    """What the gradient norm is taken over: the trainable parameters; under FSDP the model's
    whole parameter list (frozen ones have no gradient and add nothing), since Accelerate's FSDP
    ``clip_grad_norm_`` recognises the model only by that list, and otherwise unscales fp16
    gradients a second time on its fallback path."""
    from accelerate.utils import DistributedType

    if run.accelerator.distributed_type == DistributedType.FSDP:
        return list(run.student.parameters())
    return run.trainable


def _as_float(x) -> float | None:
    """A gradient norm as a float: None under DeepSpeed without one, a DTensor under FSDP2."""
    if x is None:
        return None
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


def check_optional_deps(recipe: Recipe) -> None:
    """The optional packages the recipe needs, checked before anything loads (one line each)."""
    if recipe.train.optimizer != "adamw":
        require("bitsandbytes", f"train.optimizer: {recipe.train.optimizer}")
    if recipe.peft is not None:
        require("peft", "the peft section (LoRA)")


# -- the run's state and its steps -----------------------------------------------------------
@dataclass
class Run:
    """Everything the steps of one run share: filled in by ``prepare_data`` and ``build_models``,
    advanced by ``train_steps``."""

    recipe: Recipe
    out: Path
    accelerator: object
    tokenizer: object = None
    config: object = None
    save_dtype: str = "float32"
    train_set: object = None
    valid_set: object = None
    plan: BatchPlan | None = None
    max_steps: int = 0
    cache: TeacherCache | None = None
    student: nn.Module | None = None
    teacher: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    trainable: list = field(default_factory=list)
    report: object = None
    frozen: list = field(default_factory=list)
    step: int = 0
    bad_steps: int = 0
    clean_step: int | None = None  # the last checkpoint written before the first non-finite step
    metrics: MetricsLog | None = None
    lock: RunLock | None = None
    replaced: Replacement | None = None  # the run --overwrite replaces, until this one can stand in for it
    identity: dict | None = None  # what defines the run (``qat.train.identity``), in every checkpoint
    changes: list = field(default_factory=list)  # allowed recipe changes made by resumes
    train_tokens: int = 0
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(recipe: Recipe, overwrite: bool = False) -> Path:
    """Run a recipe: check -> processes -> data and run directory -> models -> resume -> steps
    (log, evaluate, checkpoint) -> final/ -> eval.json. Returns the run directory."""
    check_optional_deps(recipe)
    resume_from, held = check_output_dir(recipe, overwrite)
    run = Run(recipe, Path(recipe.output_dir), start_processes(recipe))
    try:
        prepare_data(run, overwrite, resume_from, held)
        build_models(run, init=resume_from is None)
        resume(run, resume_from)
        train_steps(run)
        write_final(run)
        evaluate_final(run)
    except BaseException:
        if run.replaced is not None and run.replaced.active:  # nothing yet to stand in for the old run
            run.replaced.restore()
            print(f"qat: the run --overwrite was to replace is back in place in {run.out}", file=sys.stderr)
        raise
    finally:
        if run.lock is not None:
            run.lock.release()
    run.accelerator.end_training()
    return run.out


def start_processes(recipe: Recipe):
    """The Accelerator (and its trackers), checked against how the processes were launched."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(recipe, Path(recipe.output_dir))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise LaunchError(
            f"{launched} processes were launched but Accelerate sees {accelerator.num_processes}, so each would train "
            "alone. On a machine without GPUs, launch with ACCELERATE_USE_CPU=1 (see launch/cpu-2proc.yaml)."
        )
    for key, n in (("quant.start_step", recipe.quant.start_step if recipe.quant else 0), ("freeze.start_step", recipe.freeze.start_step)):
        if n and accelerator.num_processes > 1:  # DDP/FSDP fix the set of trained parameters when they wrap the model
            raise RecipeError(f"{key}: a schedule inside the run is single-process for now ({accelerator.num_processes} processes launched)")
    set_seed(recipe.train.seed)
    if accelerator.is_main_process and recipe.model.trust_remote_code:
        print(f"model.trust_remote_code is true: Python code shipped with {recipe.model.path or 'the model type'} "
              "(and its teacher and tokenizer) will be executed")
    return accelerator


def prepare_data(run: Run, overwrite: bool, resume_from: Path | None, held: bool = False) -> None:
    """recipe -> tokenizer, config, a weightless check of quant/freeze -> data, all before the run
    directory is touched: the main process goes first, and writes it only once everything passed.
    Teacher-generated data and the teacher's top-k cache are made by every process, each its share
    of the shards (split once by the main process)."""
    recipe, acc, t = run.recipe, run.accelerator, run.recipe.train
    with acc.main_process_first():
        run.tokenizer = tokenizer_for(recipe, run.out, reuse_trained=not run.main or recipe.checkpoint.resume is not None)
        run.config = model_config(recipe, run.tokenizer)
        check_sources(recipe, run.config, run.tokenizer)  # whole weight files, matching vocabularies
        run.save_dtype = final_dtype(recipe, run.config)  # from the source config, before loading changes it
        check_positions(recipe, run.config)
        dry_run_quant(recipe, run.config)
    if recipe.data.source == "teacher-generated":  # every process samples its share of the shards
        generate_cached(recipe, run.tokenizer, accelerator=acc)
    with acc.main_process_first():
        try:
            run.train_set, run.valid_set = build_run_datasets(recipe, run.tokenizer)  # teacher-generated: cached samples
        except ValueError as e:
            raise RecipeError(str(e)) from None
        run.plan = BatchPlan(len(run.train_set), t.micro_batch_size, acc.num_processes, acc.process_index, t.seed)
        steps_per_epoch = run.plan.per_epoch // t.grad_accum
        if steps_per_epoch == 0:
            raise RecipeError(
                f"train.micro_batch_size: one global batch (micro_batch_size x processes x train.grad_accum = "
                f"{t.micro_batch_size * acc.num_processes * t.grad_accum} blocks) is more than the data's {len(run.train_set)} training blocks"
            )
        if recipe.distill.teacher_cache is not None:
            check_teacher_cache(recipe, run.train_set)  # a cache made with other settings is refused here
        if run.main:
            start_run_dir(run, clear=overwrite and resume_from is None, resuming=resume_from is not None, held=held)
    run.max_steps = t.max_steps if t.max_steps is not None else math.ceil(t.epochs * steps_per_epoch)
    if run.main:
        run.identity = run_identity(recipe, run.train_set)
    if recipe.distill.teacher_cache is not None:  # the teacher's top-k computed once; then the teacher is not loaded
        used = blocks_used(run.plan, run.max_steps * t.grad_accum)
        run.cache = TeacherCache(precompute_teacher_cache(recipe, run.train_set, used, acc, run.main))


def build_models(run: Run, init: bool) -> None:
    """Student (fake-quant, frozen layers, LoRA) and teacher, the optimizer, Accelerate's wrapping.

    Under FSDP2 the weights are read once: the main process loads the student and the teacher,
    the others build their structure on the meta device, and Accelerate's wrapping broadcasts
    the main process's tensors shard by shard (``load_once``). The MSE clip search of a fresh
    run is split over the processes, each on its device (``qat.policy.search``); a resume skips
    it (the checkpoint holds the qparams)."""
    recipe, acc, t = run.recipe, run.accelerator, run.recipe.train
    once = load_once(acc)
    real = run.main or not once
    student, run.teacher = load_models(recipe, run.config, with_teacher=run.cache is None, weights=real)
    if once:
        wait_for_everyone(acc, "the main process reading the student and the teacher")
    ratios = {}
    if recipe.quant is not None and init:
        ratios = clip_ratios(student, quant_plan(recipe, run.config), acc, progress=run.main)
    run.report, run.frozen = build_student_quant(student, recipe, init=init, ratios=ratios)
    calib = init_calibration(recipe, run.train_set) if real else None
    student = apply_lora(student, recipe, calib, init=real)  # peft: LoRA-QAT (the structure only where the weights come by broadcast)
    if run.main:
        print(run.report.summary() if run.report else f"no quantization (quant: null): plain {'fine-tuning' if recipe.model.path else 'pretraining'}")
        if run.frozen:
            print(f"frozen at their quantized values ({recipe.freeze.policy}): {len(run.frozen)} layers")
    if t.activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False
    optimizer = build_optimizer(student, recipe)  # before a delayed freeze: the same parameter groups on resume
    if recipe.quant is not None and recipe.quant.start_step:
        set_fake_quant(student, False)  # plain fine-tuning until quant.start_step
    run.student, run.optimizer = acc.prepare(student, optimizer)
    if t.compile:  # after the DDP / FSDP wrapping, as Accelerate's own dynamo plugin does (which
        run.student = torch.compile(run.student)  # lives in its process-wide state: not set per run)
    if run.teacher is not None:
        # sharded like the student under FSDP; elsewhere only placed (DDP refuses a model with
        # nothing to train, and a frozen teacher needs no gradient sync)
        from accelerate.utils import DistributedType, fsdp2_prepare_model

        if acc.is_fsdp2:  # Accelerate's FSDP2 `prepare` wants an optimizer; the teacher has none
            run.teacher = fsdp2_prepare_model(acc, run.teacher if once else run.teacher.to(acc.device))
        else:
            registered = len(acc._models)
            run.teacher = acc.prepare_model(run.teacher, evaluation_mode=acc.distributed_type != DistributedType.FSDP)
            del acc._models[registered:]  # a frozen teacher is not training state: checkpoints hold only what resume needs
    run.trainable = [p for p in run.student.parameters() if p.requires_grad]


def load_once(accelerator) -> bool:
    """Whether this launch reads the models once (FSDP2 over several processes: Accelerate's
    ``cpu_ram_efficient_loading``, switched on here whatever the launch config says, so every
    process takes its shards from the main process's copy instead of loading its own)."""
    if not getattr(accelerator, "is_fsdp2", False) or accelerator.num_processes == 1:
        return False
    accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = True
    return True


def resume(run: Run, resume_from: Path | None) -> None:
    """Load a checkpoint (model, optimizer, RNG, step) once it is known to be whole and this
    run's, write the recipe, and open metrics.jsonl and the trackers."""
    recipe, acc = run.recipe, run.accelerator
    if resume_from is not None:
        resume_from = verified_checkpoint(run, resume_from)
    if resume_from is not None:
        state = read_state(resume_from)
        if recipe.freeze.start_step and freeze_due(recipe, state["step"]):
            freeze_layers(acc.unwrap_model(run.student), recipe)  # the checkpoint holds the frozen layout
        check_rng_state(resume_from, acc.process_index)
        try:  # safetensors for the models; accelerate reads the rest with torch.load(weights_only=True)
            acc.load_state(str(resume_from))
        except Exception as e:
            raise CheckpointError(f"could not load checkpoint {resume_from} ({e.__class__.__name__}: {first_line(e)})") from e
        run.step, run.bad_steps = state["step"], state.get("bad_steps", 0)
        run.clean_step = state.get("clean_step", run.step if run.bad_steps == 0 else None)
        run.train_tokens = state.get("train_tokens", qat_train_tokens(recipe, run.step, acc.num_processes))
        if run.main:
            print(f"resumed from {resume_from} at step {run.step}")
    elif recipe.checkpoint.resume == "auto" and run.main:
        print("checkpoint.resume=auto: no complete checkpoint found, starting from step 0")
    if run.main and (resume_from is not None or not (run.out / "recipe.yaml").exists()):
        write_text_atomic(run.out / "recipe.yaml", recipe.to_yaml())  # a resume: only once the checkpoint is known to be this run's
    init_tracking(recipe, acc, run.out)
    run.metrics = MetricsLog(run.out / "metrics.jsonl", acc, run.step)


def check_rng_state(ckpt: Path, rank: int) -> None:
    """The RNG state of this process in ``ckpt`` loads (Accelerate skips one that does not, in
    silence, and the resumed run would draw other random numbers than the run it continues)."""
    from accelerate.utils import RNG_STATE_NAME, load

    path = ckpt / f"{RNG_STATE_NAME}_{rank}.pkl"
    try:
        states = load(path)
        torch.get_rng_state().copy_(states["torch_manual_seed"])  # the shape and type it must have
    except Exception as e:
        raise CheckpointError(f"could not load checkpoint {ckpt}: its random state {path.name} does not load "
                              f"({e.__class__.__name__}: {first_line(e)})") from None


def verified_checkpoint(run: Run, resume_from: Path) -> Path | None:
    """The checkpoint to resume from: checksums, state and step verified (an older one if need
    be), then its run identity compared with this run's (``qat.train.identity``), by the main
    process alone (every file is read once), the answer shared with all. Checkpoints newer than
    the chosen one are set aside (``stale-step-N``)."""
    choice = None
    if run.main:
        explicit = None if run.recipe.checkpoint.resume == "auto" else resume_from
        try:
            ckpt, passed_over = usable_checkpoint(run.out / "checkpoints", explicit, run.max_steps)
            if ckpt is not None:
                run.changes = check_identity(run, ckpt)
                if ckpt.parent.resolve() == (run.out / "checkpoints").resolve():  # newer ones are not this continuation's
                    passed_over += set_aside_newer(run.out / "checkpoints", read_state(ckpt)["step"])
            choice = (str(ckpt) if ckpt else None, passed_over, None)
        except (CheckpointError, RecipeError) as e:
            choice = (None, [], (e.__class__.__name__, str(e)))
    ckpt, passed_over, error = from_main_process(choice, run.accelerator)
    if error is not None:
        raise (RecipeError if error[0] == "RecipeError" else CheckpointError)(error[1])
    for line in passed_over if run.main else ():
        print(f"checkpoint.resume: {line}")
    return Path(ckpt) if ckpt else None


def check_identity(run: Run, ckpt: Path) -> list:
    """The allowed changes a resume from ``ckpt`` makes (printed), after ``RecipeError`` for a
    checkpoint of another run (another run directory's, or other settings, weights or data)."""
    state = read_state(ckpt)
    own = ckpt.parent.resolve() == (run.out / "checkpoints").resolve()
    mine, theirs = (marker(run.out) or {}).get("run_id"), state.get("run_id")
    if own and mine and theirs and mine != theirs:
        raise RecipeError(f"checkpoint.resume: {ckpt} was written by another run (run id {theirs}, this directory's is {mine}); "
                          "move it out of checkpoints/ to resume this run's own, or resume it from a run directory of its own")
    old = state.get("identity")
    if old is None:  # written before checkpoints carried an identity: nothing to compare
        return list(state.get("changes", []))
    refused, allowed = compare_identity(old, run.identity)
    if refused:
        raise RecipeError(f"checkpoint.resume: {ckpt} belongs to a run with other settings; what differs: " + "; ".join(refused)
                          + ". Resume with the recipe it was written with, or start a new run (another output_dir, or --overwrite)")
    for c in allowed:
        print(f"checkpoint.resume: continuing with {c['key']} changed from {c['from']!r} to {c['to']!r}")
    return [*state.get("changes", []), *({**c, "step": state["step"]} for c in allowed)]


def loss_on(run: Run, batch: dict, idx: torch.Tensor):
    """(loss, kd, ce) of one micro-batch: student forward, teacher logits (live, from the top-k
    cache, or none: CE only), the recipe's distillation loss."""
    d = run.recipe.distill
    logits = run.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    t_out = None
    if run.cache is not None:
        t_out = run.cache.lookup(idx, logits.device)
    elif run.teacher is not None:
        with torch.no_grad():
            t_out = run.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    kd_w, ce_w = (d.kd_weight, d.ce_weight) if t_out is not None else (0.0, 1.0)
    return distill_loss(logits, t_out, batch["labels"], d.loss, d.temperature, kd_w, ce_w, d.chunk_tokens)


def optimizer_step(run: Run) -> tuple[torch.Tensor, str | None, float, int, int]:
    """One optimizer step over ``grad_accum`` micro-batches. Returns the summed (loss, kd, ce,
    count), why the step was skipped (None: it was taken), the gradient norm, tokens, epoch."""
    acc, t = run.accelerator, run.recipe.train
    sums, bad, grad_norm, tokens, epoch = torch.zeros(4, device=acc.device), None, float("nan"), 0, 0
    for micro in range(t.grad_accum):
        epoch, idx = run.plan.indices(run.step * t.grad_accum + micro)
        batch = batch_of(run.train_set, idx, acc.device)
        with acc.accumulate(run.student):
            loss, kd, ce = loss_on(run, batch, idx)
            acc.backward(loss)
            sums += torch.stack([loss.detach(), (kd if kd is not None else loss).detach(), ce.detach(), torch.ones_like(ce)])
            if acc.sync_gradients:
                grad_norm = _as_float(acc.clip_grad_norm_(clip_parameters(run), t.grad_clip or float("inf")))
                bad = nonfinite_step(sums, grad_norm, acc)
                if bad is None:
                    run.optimizer.step()
                elif acc.scaler is not None:  # fp16: the GradScaler unscaled this step's gradients; it
                    acc.scaler.update()  # must close the step (lowering its scale) or the next unscale raises
            run.optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients are dropped here
        tokens += int(batch["attention_mask"].sum()) * acc.num_processes
    return sums, bad, grad_norm, tokens, epoch


def skip_step(run: Run, bad: str, epoch: int, lr: float, grad_norm: float) -> None:
    """Count a skipped (non-finite) step; past ``train.max_bad_steps`` the run stops."""
    t = run.recipe.train
    run.bad_steps += 1
    run.metrics.log({"step": run.step, "epoch": epoch, "skipped": bad, "bad_steps": run.bad_steps, "lr": lr, "grad_norm": grad_norm})
    if run.bad_steps > t.max_bad_steps:
        run.accelerator.end_training()
        raise TrainingStopped(
            f"step {run.step}: {bad}; {run.bad_steps} steps skipped, more than train.max_bad_steps={t.max_bad_steps}, so "
            f"the run stopped. No skipped step updated the weights, and the last complete checkpoint "
            f"({latest_checkpoint(run.out / 'checkpoints') or 'none: checkpoint.every is 0 or not reached'}) is intact"
        )
    if run.main:
        warnings.warn(f"step {run.step}: {bad}, step skipped ({run.bad_steps} of at most train.max_bad_steps={t.max_bad_steps})")


def log_row(run: Run, sums: torch.Tensor, epoch: int, lr: float, grad_norm: float, tokens: int, since: float, t_step: float, do_eval: bool) -> dict:
    """The metrics.jsonl row of the steps since the last log (means over every process), with the
    validation perplexity when this is an in-loop evaluation step."""
    mean = run.accelerator.reduce(sums, reduction="mean")
    now = time.perf_counter()
    row = {
        "step": run.step,
        "epoch": epoch,
        "loss": (mean[0] / mean[3]).item(),
        "kd_loss": (mean[1] / mean[3]).item() if run.teacher is not None or run.cache is not None else None,
        "ce_loss": (mean[2] / mean[3]).item(),
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / (now - since),
        "step_time_s": now - t_step,
        "peak_mem_gb": peak_memory_gb(run.accelerator.device),
    }
    if do_eval:
        ev = run.recipe.eval
        v = perplexity(run.student, run.valid_set, ev.batch_size, ev.max_batches, accelerator=run.accelerator)
        row.update(val_ppl=v["ppl"], val_loss=v["nll"])
    run.metrics.log(row)
    return row


def train_steps(run: Run) -> None:
    """The loop: schedule, step, log (and evaluate), checkpoint, until ``max_steps``; SIGINT or
    SIGTERM stops it at a step boundary, after a checkpoint when the recipe checkpoints."""
    from tqdm.auto import tqdm

    recipe = run.recipe
    pbar = tqdm(total=run.max_steps, initial=run.step, disable=not run.main or run.step >= run.max_steps, desc="qat train", dynamic_ncols=True)
    window = {"sums": torch.zeros(4, device=run.accelerator.device), "tokens": 0, "since": time.perf_counter()}  # since the last log row
    run.student.train()
    if recipe.quant is not None and recipe.quant.start_step and run.step > recipe.quant.start_step:
        set_fake_quant(run.student, True)  # resumed past the switch (the checkpoint holds its qparams)
    try:  # the bar is closed before any message that ends the run (Ctrl-C, a stop) is printed
        with stop_requests(run.main) as got:
            while run.step < run.max_steps:
                bad = one_step(run, pbar, window)
                signum = stop_signal(run, got)
                if signum:
                    if recipe.checkpoint.every and bad is None and run.step % recipe.checkpoint.every:
                        checkpoint(run)  # the step boundary: what was trained is kept
                    raise Interrupted(signum)
    finally:
        pbar.close()


def one_step(run: Run, pbar, window: dict) -> str | None:
    """One optimizer step of the loop with its log row (``window``: the sums, tokens and start of
    the rows's steps), evaluation and checkpoint; returns why it was skipped (None: taken)."""
    recipe, t = run.recipe, run.recipe.train
    schedule_transitions(run.accelerator.unwrap_model(run.student), recipe, run.step, run.main)
    t_step, lr = time.perf_counter(), lr_at(run.step, recipe, run.max_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    sums, bad, grad_norm, n_tokens, epoch = optimizer_step(run)
    run.step += 1
    run.train_tokens += qat_train_tokens(recipe, 1, run.accelerator.num_processes)
    window["tokens"] += n_tokens
    pending = window["sums"]
    if bad is not None:  # skipped: no update; the data moves on
        skip_step(run, bad, epoch, lr, grad_norm)
    else:
        pending += sums
    do_eval = run.valid_set is not None and recipe.eval.every and run.step % recipe.eval.every == 0 and run.step < run.max_steps
    if (run.step % t.log_every == 0 or run.step == run.max_steps or do_eval) and pending[3].item() > 0:
        row = log_row(run, pending, epoch, lr, grad_norm, window["tokens"], window["since"], t_step, do_eval)
        if do_eval and run.main:
            pbar.write(f"step {run.step}: validation perplexity {row['val_ppl']:.4f} (loss {row['val_loss']:.4f})")
        pbar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)  # shown by the update below
        pending.zero_()
        window["tokens"], window["since"] = 0, time.perf_counter()
    pbar.update(1)
    if recipe.checkpoint.every and run.step % recipe.checkpoint.every == 0 and bad is None:  # none while steps are skipped
        checkpoint(run)
    return bad


def checkpoint(run: Run) -> None:
    """Save a checkpoint. Once a step has been skipped, pruning keeps the last checkpoint written
    before it, however many newer ones there are: the weights it holds predate the trouble."""
    if run.bad_steps == 0:
        run.clean_step = run.step
    root = run.out / "checkpoints"
    protect = root / f"step-{run.clean_step}" if run.bad_steps and run.clean_step is not None else None
    state = {"max_steps": run.max_steps, "bad_steps": run.bad_steps, "clean_step": run.clean_step, "train_tokens": run.train_tokens,
             "run_id": (marker(run.out) or {}).get("run_id") if run.main else None, "identity": run.identity, "changes": run.changes}
    save_checkpoint(run.accelerator, root, run.step, state, run.recipe.checkpoint.keep, protect=protect)
    if run.replaced is not None:  # the new run can stand in for the one --overwrite replaces
        run.replaced.commit()


def write_final(run: Run) -> None:
    """final/: the full state (gathered when sharded) put into the student's structure on the main
    process, dequantized and saved in plain HF layout (``qat.io.final``). The structure is built
    on the meta device and takes the gathered tensors as they are (``assign``): no second copy
    of the weights, nothing read from disk, and no qparam search (the trained qparams are in the
    state). In one process the state's tensors are the student's own: only a merged LoRA adapter
    is written into them in place (``merge_lora_``), after the last step, when the student's
    weights are no longer used."""
    recipe, acc = run.recipe, run.accelerator
    drop_optimizer_state(run)
    state = acc.get_state_dict(run.student)
    if recipe.train.compile:  # torch.compile's wrapper prefixes every key
        state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if run.main:
        final = student_skeleton(recipe, run.config)
        build_student_quant(final, recipe, at_step=run.step)  # a delayed freeze in force at the end included
        final = apply_lora(final, recipe, init=False)
        final.load_state_dict(state, assign=True)
        state.clear()  # the skeleton holds the tensors now: each frees as its layer is dequantized
        trained = acc.unwrap_model(run.student)
        trained = getattr(trained, "_orig_mod", trained)
        base = final.get_base_model() if hasattr(final, "get_base_model") else final  # a PeftModel: its model
        base.generation_config = copy.deepcopy(trained.generation_config)
        base.tie_weights()  # assign=True left tied names as two tensors
        try:
            with writing_final(run.out / "final") as tmp:  # atomic: a failed write leaves no partial final/
                save_lora_final(final, run.tokenizer, tmp, DTYPES[run.save_dtype], forward_param_dtype(acc))  # peft: merged and re-quantized, or adapter/
        except Exception as e:  # OSError, or what safetensors / torch raise for a failed write
            if write_failure(e, run.out) is None:
                raise
            last = latest_checkpoint(run.out / "checkpoints")
            raise DiskError(run.out / "final", e, f"nothing partial was left; the last checkpoint is {last}" if last else "nothing partial was left") from None
        del final
        if run.replaced is not None:  # the new run can stand in for the one --overwrite replaces
            run.replaced.commit()
    del state
    wait_for_everyone(acc, "the main process writing final/")


def drop_optimizer_state(run: Run) -> None:
    """After the last step the optimizer's state (AdamW's moments: 8 bytes a parameter) serves
    nothing (a checkpoint holds its own copy): freed before final/ is gathered. Under DeepSpeed
    the engine owns it."""
    from accelerate.utils import DistributedType

    if run.optimizer is not None and run.accelerator.distributed_type != DistributedType.DEEPSPEED:
        run.optimizer.zero_grad(set_to_none=True)
        run.optimizer.state.clear()


def forward_param_dtype(accelerator) -> torch.dtype | None:
    """The dtype FSDP2's mixed precision casts the parameters to for the forward (None: no cast),
    so final/ is written from the parameters the training forward saw."""
    if not getattr(accelerator, "is_fsdp2", False):
        return None
    policy = getattr(accelerator.state.fsdp_plugin, "mixed_precision_policy", None)
    return getattr(policy, "param_dtype", None)


def evaluate_final(run: Run) -> None:
    """eval.json: final/ as loaded from disk (exact weights, fp32 arithmetic) vs the teacher, on
    every process; logged to the trackers."""
    recipe, acc = run.recipe, run.accelerator
    result = {"steps": run.step, "processes": acc.num_processes, "train_tokens": run.train_tokens, "resume_changes": run.changes,
              "wall_time_s": None, "quantized_layers": len(run.report.layers) if run.report else 0, "frozen_layers": run.frozen}
    if run.valid_set is not None:
        ev = recipe.eval
        run.student, run.optimizer = acc.free_memory(run.student, run.optimizer)  # trained and written: final/ stands in for it
        final = load_final_for_eval(run)
        result["student"] = perplexity(final, run.valid_set, ev.batch_size, ev.max_batches, teacher=run.teacher, accelerator=acc, desc="eval final/")
        if run.teacher is not None:
            result["teacher"] = perplexity(run.teacher, run.valid_set, ev.batch_size, ev.max_batches, accelerator=acc, desc="eval teacher")
        if run.main:
            print(_eval_line(result))
    if run.main:
        result["wall_time_s"] = time.perf_counter() - run.t_start
        try:
            write_json_atomic(run.out / "eval.json", result)
        except OSError as e:
            raise DiskError(run.out / "eval.json", e, f"final/ is complete in {run.out / 'final'}") from None
        if acc.trackers:
            try:
                acc.log({f"final/{k}_ppl": v["ppl"] for k, v in result.items() if isinstance(v, dict)}, step=run.step)
            except Exception as e:
                warnings.warn(f"wandb logging failed: {e}")
    wait_for_everyone(acc, "the main process writing eval.json")


def load_final_for_eval(run: Run) -> nn.Module:
    """final/ as ``from_pretrained`` loads it, in float32. Under FSDP2 it is read once, by the
    main process, and sharded over the processes (the others hold its structure until the
    broadcast), computing in float32 as a one-process ``qat eval`` does; elsewhere every process
    loads its own (DDP's replicas)."""
    recipe, acc, path = run.recipe, run.accelerator, run.out / "final"
    trust = recipe.model.trust_remote_code
    if not load_once(acc) or has_adapter(path):
        return load_model_dir(path, "float32", str(acc.device), trust)[0]
    from accelerate.utils import fsdp2_prepare_model

    model = load_model_dir(path, "float32", "cpu", trust)[0] if run.main else empty_model_dir(path, "float32", trust)
    plugin = acc.state.fsdp_plugin
    cast, plugin.mixed_precision_policy = plugin.mixed_precision_policy, None  # no bf16 cast: float32 arithmetic
    try:
        return fsdp2_prepare_model(acc, model)
    finally:
        plugin.mixed_precision_policy = cast


def _eval_line(result: dict) -> str:
    s = result["student"]
    line = f"validation perplexity: student {s['ppl']:.3f} over {s['tokens']} tokens"
    if "teacher" in result:
        line += f", teacher {result['teacher']['ppl']:.3f} (student/teacher {s['ppl'] / result['teacher']['ppl']:.4f})"
    return line
