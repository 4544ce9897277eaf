"""The QAT loop on Accelerate, in one file: recipe -> student + teacher -> data -> steps -> final/.

Per optimizer step and micro-batch: teacher forward (no grad; or its top-k read from the
teacher cache), student forward through the fake-quant layers, loss = kd_weight * KD +
ce_weight * CE over the shifted real tokens (qat/distill.py, chunked over tokens),
backward (Accelerate: DDP / FSDP, mixed precision, gradient accumulation), clip, step.

Data order is a pure function of (seed, step): every epoch is a seeded permutation of the
blocks; the global micro-batch k takes the next ``micro_batch_size * num_processes`` indices and
rank r its own slice. A run resumed from step N therefore sees exactly the batches an
uninterrupted run sees, and 1 process with batch 2B sees the same global batches as 2 with B.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, latest_checkpoint, read_state, save_checkpoint
from .deps import available, hint, require
from .data import build_datasets, load_documents, train_tokenizer
from .distill import distill_loss
from .eval import perplexity
from .final import final_dtype
from .generate import build_run_datasets
from .lora import apply_lora, init_calibration, save_lora_final
from .quant import QuantReport, apply_freeze, quantize_model
from .quant.apply import reinit_qparams, set_fake_quant
from .quant import fused
from .quant.scheme import QuantConfigError
from .recipe import Recipe, RecipeError
from .teacher_cache import TeacherCache
from .teacher_cache import check as check_teacher_cache
from .teacher_cache import precompute as precompute_teacher_cache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RUN_FILES = ("recipe.yaml", "metrics.jsonl", "eval.json", "checkpoints", "final", "tokenizer", "wandb")


# -- setup ---------------------------------------------------------------------------------
def check_output_dir(recipe: Recipe, overwrite: bool) -> Path | None:
    """Refuse to clobber another run; return the checkpoint to resume from, if any. Writes nothing.

    Every file of a run lives under output_dir: a run file that is a symbolic link (which could
    point anywhere) is refused, and a checkpoint from elsewhere only starts a run in a directory
    that holds none (or with --overwrite)."""
    out = Path(recipe.output_dir)
    for f in RUN_FILES:
        if (out / f).is_symlink():
            raise RecipeError(f"output_dir: {out / f} is a symbolic link; qat writes only inside output_dir, remove it")
    holds_run = any((out / f).exists() for f in ("recipe.yaml", "metrics.jsonl", "final", "checkpoints"))
    resume = recipe.checkpoint.resume
    if resume == "auto":
        return latest_checkpoint(out / "checkpoints")
    if resume is not None:
        ckpt = Path(resume).resolve()
        if holds_run and not overwrite and (out / "checkpoints").resolve() not in ckpt.parents:
            raise RecipeError(
                f"checkpoint.resume: {resume} is not a checkpoint of the run in output_dir {out}; "
                "pass --overwrite to replace that run, or choose another output_dir"
            )
        return Path(resume)
    if not overwrite and holds_run:
        raise RecipeError(
            f"output_dir: {out} already holds a run; pass --overwrite to replace it or checkpoint.resume=auto to continue it"
        )
    return None


def start_run_dir(recipe: Recipe, out: Path, tokenizer, clear: bool) -> None:
    """Create the run directory (after --overwrite: emptied of the old run's files), with the
    resolved recipe and a trained tokenizer."""
    if clear:
        for f in RUN_FILES:
            p = out / f
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(recipe.to_yaml())
    if recipe.tokenizer_path is None and not (out / "tokenizer" / "tokenizer.json").exists():
        tokenizer.save_pretrained(out / "tokenizer")


def load_tokenizer(recipe: Recipe, out: Path, reuse_trained: bool):
    """The recipe's tokenizer, or one trained on the training data (in memory: the run directory
    gets it in ``start_run_dir``); ``reuse_trained``: take the run's own ``tokenizer/`` if there."""
    from transformers import AutoTokenizer

    if recipe.tokenizer_path is not None:
        key = "tokenizer.path" if recipe.tokenizer.path else "model.path"
        try:
            return AutoTokenizer.from_pretrained(recipe.tokenizer_path, trust_remote_code=recipe.model.trust_remote_code)
        except (OSError, ValueError) as e:
            raise RecipeError(f"{key}: could not load a tokenizer from {recipe.tokenizer_path}: {_first_line(e)}") from None
    tok_dir = out / "tokenizer"  # trained once per run, reused on resume
    if reuse_trained and (tok_dir / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(tok_dir)
    try:
        return train_tokenizer(load_documents(recipe.data, "train"), recipe.tokenizer.train_vocab_size)
    except ValueError as e:
        raise RecipeError(str(e)) from None


def model_config(recipe: Recipe, tokenizer):
    from transformers import AutoConfig

    m = recipe.model
    if m.path is not None:
        try:
            return AutoConfig.from_pretrained(m.path, revision=m.revision, trust_remote_code=m.trust_remote_code)
        except (OSError, ValueError) as e:
            raise RecipeError(f"model.path: could not load the config of {m.path}: {_first_line(e)}") from None
    kw = dict(m.config)
    kw.setdefault("vocab_size", len(tokenizer))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        kw.setdefault(key, getattr(tokenizer, key))
    from transformers import CONFIG_MAPPING

    if kw["model_type"] not in CONFIG_MAPPING:
        raise RecipeError(f"model.config.model_type: unknown model type {kw['model_type']!r} (e.g. llama, mistral, qwen2, opt)")
    try:
        return AutoConfig.for_model(**kw)
    except (ValueError, TypeError, KeyError) as e:
        raise RecipeError(f"model.config: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [e.__class__.__name__])[0]


def dry_run_quant(recipe: Recipe, config) -> None:
    """Apply quantization and freezing to a weightless (meta) copy of the model, so that bad
    patterns or group sizes fail before any weights load."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    except (ValueError, TypeError, KeyError) as e:
        raise RecipeError(f"{'model.path' if recipe.model.path else 'model.config'}: cannot build the model: {_first_line(e)}") from None
    try:
        report, _ = build_student_quant(model, recipe, at_step=math.inf)  # a delayed freeze policy is checked too
    except QuantConfigError as e:
        key = _quant_error_key(str(e), recipe)
        hint = ""
        if key == "freeze.policy" and recipe.freeze.policy == "ov-freeze":
            hint = " (this model has no such projections: set freeze.patterns to its value/output projections, e.g. OPT: ['\\.v_proj$', '\\.out_proj$'])"
        raise RecipeError(f"{key}: {e}{hint}") from None
    if recipe.quant is not None and recipe.quant.init_from is not None:
        from .init_from import check_layers

        check_layers(report.layers, recipe.quant.init_from)


def _quant_error_key(msg: str, recipe: Recipe) -> str:
    """The recipe key a ``QuantConfigError`` from ``quantize_model`` / ``apply_freeze`` is about."""
    if msg.startswith("freeze"):
        return "freeze.patterns" if recipe.freeze.patterns else "freeze.policy"
    for prefix, key in (("targets", "quant.targets"), ("ignore", "quant.ignore"), ("layer_schemes", "quant.overrides")):
        if msg.startswith(prefix):
            return key
    layer = re.match(r"layer '([^']+)': group_size", msg)
    if layer and recipe.quant is not None:  # the first override matching the layer gave it its group size
        for i, o in enumerate(recipe.quant.overrides):
            if re.search(o.pattern, layer.group(1)):
                return f"quant.overrides.{i}.group_size" if o.group_size is not None else "quant.group_size"
        return "quant.group_size"
    return "quant"


def build_student_quant(model: nn.Module, recipe: Recipe, init: bool = False, at_step: float = 0) -> tuple[QuantReport | None, list[str]]:
    """Wrap the Linears (and with ``init``, load ``quant.init_from``: the real student only), then
    freeze the layers whose freeze is in force at the top of step ``at_step`` (see ``freeze_due``)."""
    report = None
    if recipe.quant is not None:
        q = recipe.quant
        fused.set_kernel(q.kernel)  # process-wide: the fake-quant implementation
        report = quantize_model(model, q.scheme(), q.targets, q.ignore, q.layer_schemes())
        if init and q.init_from is not None:
            from .init_from import load_quantized_start

            print(load_quantized_start(model, q.init_from))
    frozen = freeze_layers(model, recipe) if freeze_due(recipe, at_step) else []
    return report, frozen


def freeze_layers(model: nn.Module, recipe: Recipe) -> list[str]:
    f = recipe.freeze
    return apply_freeze(model, f.policy, f.patterns, scales=f.scales)


def freeze_due(recipe: Recipe, step: float) -> bool:
    """Is the freeze policy in force at the top of step ``step``? A delayed freeze
    (``freeze.start_step`` N > 0) happens at the top of step N, so it is in force from N + 1 on."""
    n = recipe.freeze.start_step
    return n == 0 or n < step


def schedule_transitions(model: nn.Module, recipe: Recipe, step: int, main: bool) -> None:
    """The in-loop schedule, at the top of step ``step``: fake-quant switched on at
    ``quant.start_step`` (qparams re-initialised from the weights trained so far), then the
    delayed freeze at ``freeze.start_step`` (layers snapped to the grid they trained under)."""
    q = recipe.quant
    if q is not None and q.start_step and step == q.start_step:
        set_fake_quant(model, True)
        n = reinit_qparams(model)
        if main:
            print(f"step {step}: fake-quant on (quant.start_step), qparams of {n} layers re-initialised from the weights")
    if recipe.freeze.start_step and step == recipe.freeze.start_step:
        frozen = freeze_layers(model, recipe)
        if main:
            print(f"step {step}: {len(frozen)} layers frozen ({recipe.freeze.policy}, freeze.start_step)")


def load_student(recipe: Recipe, config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    m = recipe.model
    kw = dict(trust_remote_code=m.trust_remote_code, attn_implementation=m.attn_implementation, dtype=DTYPES[m.dtype])
    if m.path is not None:
        return AutoModelForCausalLM.from_pretrained(m.path, revision=m.revision, **kw)
    return AutoModelForCausalLM.from_config(config, **kw)


def load_models(recipe: Recipe, config, with_teacher: bool = True):
    from transformers import AutoModelForCausalLM

    student = load_student(recipe, config)
    teacher = None
    if recipe.teacher is not None and with_teacher:
        m = recipe.model
        teacher = AutoModelForCausalLM.from_pretrained(
            recipe.teacher_path,
            dtype=DTYPES[recipe.teacher.dtype],
            trust_remote_code=m.trust_remote_code,
            attn_implementation=m.attn_implementation,
        )
        teacher.eval().requires_grad_(False)
    return student, teacher


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    t = recipe.train
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            is_qparam = name.endswith(("weight_scale", "weight_zero_point"))
            (decay if p.ndim >= 2 and not is_qparam else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=t.lr, betas=t.betas, eps=t.eps)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kw)
    bnb = require("bitsandbytes", f"train.optimizer: {t.optimizer}")
    cls = bnb.optim.AdamW8bit if t.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, **kw)


def lr_at(step: int, recipe: Recipe, max_steps: int) -> float:
    t = recipe.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, max_steps - t.warmup_steps))
    factor = 1 - progress if t.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * factor)


class BatchPlan:
    """Global micro-batch ``k`` -> this rank's block indices; a pure function of (seed, k)."""

    def __init__(self, n_blocks: int, micro_batch_size: int, world: int, rank: int, seed: int, shuffle: bool = True):
        self.n, self.micro, self.world, self.rank, self.seed, self.shuffle = n_blocks, micro_batch_size, world, rank, seed, shuffle
        self.per_epoch = n_blocks // (micro_batch_size * world)
        self._perm_epoch, self._perm = None, None

    def indices(self, k: int) -> tuple[int, torch.Tensor]:
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
            self._perm_epoch = epoch
        start = pos * self.micro * self.world + self.rank * self.micro
        return epoch, self._perm[start : start + self.micro]


def blocks_used(plan: BatchPlan, micro_batches: int) -> torch.Tensor:
    """Every block index that any process reads in the first ``micro_batches`` global micro-batches."""
    whole = BatchPlan(plan.n, plan.micro * plan.world, 1, 0, plan.seed, plan.shuffle)  # rank slices joined
    return torch.unique(torch.cat([whole.indices(k)[1] for k in range(micro_batches)]))


def batch_of(blocks, idx: torch.Tensor, device) -> dict[str, torch.Tensor]:
    ids = blocks.input_ids[idx].to(device)
    mask = blocks.attention_mask[idx].to(device)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class LaunchError(RuntimeError):
    """The processes were launched in a way that cannot train (the CLI: one line, exit code 2)."""


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


def _as_float(x) -> float | None:
    """A gradient norm as a float: None under DeepSpeed without one, a DTensor under FSDP2."""
    if x is None:
        return None
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


# -- logging -------------------------------------------------------------------------------
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
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
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


def check_optional_deps(recipe: Recipe) -> None:
    """The optional packages the recipe needs, checked before anything loads (one line each)."""
    if recipe.train.optimizer != "adamw":
        require("bitsandbytes", f"train.optimizer: {recipe.train.optimizer}")
    if recipe.peft is not None:
        require("peft", "the peft section (LoRA)")


def make_accelerator(recipe: Recipe, out: Path):
    from accelerate import Accelerator

    tr = recipe.tracking
    use_wandb = tr.wandb_project is not None and tr.mode != "disabled" and available("wandb")
    if tr.wandb_project is not None and tr.mode != "disabled" and not use_wandb and int(os.environ.get("RANK", "0")) == 0:
        print(f"qat: {hint('wandb', 'tracking.wandb_project')}; logging to metrics.jsonl only", file=sys.stderr)
    return Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.grad_accum,
        log_with="wandb" if use_wandb else None,
        project_dir=str(out),
    )


# -- the loop ------------------------------------------------------------------------------
def train(recipe: Recipe, overwrite: bool = False) -> Path:
    from accelerate.utils import set_seed

    out = Path(recipe.output_dir)
    check_optional_deps(recipe)
    resume_from = check_output_dir(recipe, overwrite)
    accelerator = make_accelerator(recipe, out)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise LaunchError(
            f"{launched} processes were launched but Accelerate sees {accelerator.num_processes}, so each would train "
            "alone. On a machine without GPUs, launch with ACCELERATE_USE_CPU=1 (see launch/cpu-2proc.yaml)."
        )
    for key, n in (("quant.start_step", recipe.quant.start_step if recipe.quant else 0), ("freeze.start_step", recipe.freeze.start_step)):
        if n and accelerator.num_processes > 1:  # DDP/FSDP fix the set of trained parameters when they wrap the model
            raise RecipeError(f"{key}: a schedule inside the run is single-process for now ({accelerator.num_processes} processes launched)")
    main = accelerator.is_main_process
    set_seed(recipe.train.seed)
    t_start = time.perf_counter()
    if main and recipe.model.trust_remote_code:
        print(f"model.trust_remote_code is true: Python code shipped with {recipe.model.path or 'the model type'} "
              "(and its teacher and tokenizer) will be executed")

    # recipe -> tokenizer, config, a weightless check of quant/freeze -> data, all before the run
    # directory is touched: the main process goes first, and writes it only once everything passed
    t = recipe.train
    with accelerator.main_process_first():
        tokenizer = load_tokenizer(recipe, out, reuse_trained=not main or recipe.checkpoint.resume is not None)
        config = model_config(recipe, tokenizer)
        save_dtype_name = final_dtype(recipe, config)
        max_pos = getattr(config, "max_position_embeddings", None)
        if max_pos is not None and recipe.data.seq_len > max_pos:
            raise RecipeError(f"data.seq_len: {recipe.data.seq_len} exceeds the model's max_position_embeddings {max_pos}")
        dry_run_quant(recipe, config)
        try:
            train_set, valid_set = build_run_datasets(recipe, tokenizer)  # teacher-generated: cached samples
        except ValueError as e:
            raise RecipeError(str(e)) from None
        plan = BatchPlan(len(train_set), t.micro_batch_size, accelerator.num_processes, accelerator.process_index, t.seed)
        steps_per_epoch = plan.per_epoch // t.grad_accum
        if steps_per_epoch == 0:
            raise RecipeError(
                f"train.micro_batch_size: one global batch (micro_batch_size x processes x train.grad_accum = "
                f"{t.micro_batch_size * accelerator.num_processes * t.grad_accum} blocks) is more than the data's {len(train_set)} training blocks"
            )
        if recipe.distill.teacher_cache is not None:
            check_teacher_cache(recipe, train_set)  # a cache made with other settings is refused here
        if main:
            start_run_dir(recipe, out, tokenizer, clear=overwrite and resume_from is None)
    max_steps = t.max_steps if t.max_steps is not None else math.ceil(t.epochs * steps_per_epoch)
    cache = None  # distill.teacher_cache: the teacher's top-k computed once, then the teacher is not loaded
    if recipe.distill.teacher_cache is not None:
        cache = TeacherCache(precompute_teacher_cache(recipe, train_set, blocks_used(plan, max_steps * t.grad_accum), accelerator, main))

    student, teacher = load_models(recipe, config, with_teacher=cache is None)
    report, frozen = build_student_quant(student, recipe, init=resume_from is None)
    student = apply_lora(student, recipe, init_calibration(recipe, train_set))  # peft: LoRA-QAT
    if main:
        print(report.summary() if report else f"no quantization (quant: null): plain {'fine-tuning' if recipe.model.path else 'pretraining'}")
        if frozen:
            print(f"frozen at their quantized values ({recipe.freeze.policy}): {len(frozen)} layers")
    if t.activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False
    optimizer = build_optimizer(student, recipe)  # before a delayed freeze: the same parameter groups on resume
    if recipe.quant is not None and recipe.quant.start_step:
        set_fake_quant(student, False)  # plain fine-tuning until quant.start_step
    student, optimizer = accelerator.prepare(student, optimizer)
    if t.compile:  # after the DDP / FSDP wrapping, as Accelerate's own dynamo plugin does (which
        student = torch.compile(student)  # lives in its process-wide state: not set per run)
    if teacher is not None:
        # sharded like the student under FSDP; elsewhere only placed (DDP refuses a model with
        # nothing to train, and a frozen teacher needs no gradient sync)
        from accelerate.utils import DistributedType

        teacher = accelerator.prepare_model(teacher, evaluation_mode=accelerator.distributed_type != DistributedType.FSDP)
    trainable = [p for p in student.parameters() if p.requires_grad]

    step, bad_steps = 0, 0
    if resume_from is not None:
        if recipe.freeze.start_step and freeze_due(recipe, read_state(resume_from)["step"]):
            freeze_layers(accelerator.unwrap_model(student), recipe)  # the checkpoint holds the frozen layout
        try:  # safetensors for the models; accelerate reads the rest with torch.load(weights_only=True)
            accelerator.load_state(str(resume_from))
        except Exception as e:
            raise CheckpointError(f"could not load checkpoint {resume_from} ({e.__class__.__name__}: {_first_line(e)})") from e
        ckpt_state = read_state(resume_from)
        step, bad_steps = ckpt_state["step"], ckpt_state.get("bad_steps", 0)
        if main:
            print(f"resumed from {resume_from} at step {step}")
    elif recipe.checkpoint.resume == "auto" and main:
        print("checkpoint.resume=auto: no complete checkpoint found, starting from step 0")
    init_tracking(recipe, accelerator, out)
    metrics = MetricsLog(out / "metrics.jsonl", accelerator, step)
    d = recipe.distill

    def loss_on(batch, idx):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        t_out = None  # full teacher logits, its cached top-k, or none (CE only)
        if cache is not None:
            t_out = cache.lookup(idx, logits.device)
        elif teacher is not None:
            with torch.no_grad():
                t_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        kd_w, ce_w = (d.kd_weight, d.ce_weight) if t_out is not None else (0.0, 1.0)
        return distill_loss(logits, t_out, batch["labels"], d.loss, d.temperature, kd_w, ce_w, d.chunk_tokens)

    from tqdm.auto import tqdm

    pbar = tqdm(total=max_steps, initial=step, disable=not main or step >= max_steps, desc="qat train", dynamic_ncols=True)
    acc = torch.zeros(4, device=accelerator.device)  # loss, kd, ce, micro-batches since last log
    tokens, t_log, grad_norm = 0, time.perf_counter(), float("nan")
    student.train()
    if recipe.quant is not None and recipe.quant.start_step and step > recipe.quant.start_step:
        set_fake_quant(student, True)  # resumed past the switch (the checkpoint holds its qparams)
    try:  # the bar is closed before any message that ends the run (Ctrl-C, a stop) is printed
        while step < max_steps:
            schedule_transitions(accelerator.unwrap_model(student), recipe, step, main)
            t_step = time.perf_counter()
            lr = lr_at(step, recipe, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_sums, bad = torch.zeros(4, device=accelerator.device), None  # as acc, for this step only
            for micro in range(t.grad_accum):
                epoch, idx = plan.indices(step * t.grad_accum + micro)
                batch = batch_of(train_set, idx, accelerator.device)
                with accelerator.accumulate(student):
                    loss, kd, ce = loss_on(batch, idx)
                    accelerator.backward(loss)
                    step_sums += torch.stack([loss.detach(), (kd if kd is not None else loss).detach(), ce.detach(), torch.ones_like(ce)])
                    if accelerator.sync_gradients:
                        grad_norm = _as_float(accelerator.clip_grad_norm_(trainable, t.grad_clip or float("inf")))
                        bad = nonfinite_step(step_sums, grad_norm, accelerator)
                        if bad is None:
                            optimizer.step()
                    optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients are dropped here
                tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            step += 1
            if bad is not None:  # skipped: no update; the data moves on
                bad_steps += 1
                metrics.log({"step": step, "epoch": epoch, "skipped": bad, "bad_steps": bad_steps, "lr": lr, "grad_norm": grad_norm})
                if bad_steps > t.max_bad_steps:
                    accelerator.end_training()
                    raise TrainingStopped(
                        f"step {step}: {bad}; {bad_steps} steps skipped, more than train.max_bad_steps={t.max_bad_steps}, so "
                        f"the run stopped. No skipped step updated the weights, and the last complete checkpoint "
                        f"({latest_checkpoint(out / 'checkpoints') or 'none: checkpoint.every is 0 or not reached'}) is intact"
                    )
                if main:
                    warnings.warn(f"step {step}: {bad}, step skipped ({bad_steps} of at most train.max_bad_steps={t.max_bad_steps})")
            else:
                acc += step_sums

            do_eval = valid_set is not None and recipe.eval.every and step % recipe.eval.every == 0 and step < max_steps
            if (step % t.log_every == 0 or step == max_steps or do_eval) and acc[3].item() > 0:
                mean = accelerator.reduce(acc, reduction="mean")
                now = time.perf_counter()
                row = {
                    "step": step,
                    "epoch": epoch,
                    "loss": (mean[0] / mean[3]).item(),
                    "kd_loss": (mean[1] / mean[3]).item() if teacher is not None or cache is not None else None,
                    "ce_loss": (mean[2] / mean[3]).item(),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens / (now - t_log),
                    "step_time_s": now - t_step,
                    "peak_mem_gb": peak_memory_gb(accelerator.device),
                }
                if do_eval:
                    v = perplexity(student, valid_set, recipe.eval.batch_size, recipe.eval.max_batches, accelerator=accelerator)
                    row.update(val_ppl=v["ppl"], val_loss=v["nll"])
                    if main:
                        pbar.write(f"step {step}: validation perplexity {v['ppl']:.4f} (loss {v['nll']:.4f})")
                metrics.log(row)
                pbar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)  # shown by the update below
                acc.zero_()
                tokens, t_log = 0, time.perf_counter()
            pbar.update(1)
            if recipe.checkpoint.every and step % recipe.checkpoint.every == 0:
                save_checkpoint(accelerator, out / "checkpoints", step, {"max_steps": max_steps, "bad_steps": bad_steps}, recipe.checkpoint.keep)
    finally:
        pbar.close()

    # final/: the full state (gathered when sharded) loaded into a fresh copy of the student on
    # the main process, dequantized and saved in plain HF layout. eval.json: final/ as loaded from
    # disk vs the teacher, evaluated on all processes.
    save_dtype = DTYPES[save_dtype_name]
    state = accelerator.get_state_dict(student)
    if recipe.train.compile:  # torch.compile's wrapper prefixes every key
        state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if main:
        final = load_student(recipe, config)
        build_student_quant(final, recipe, at_step=step)  # a delayed freeze in force at the end included
        final = apply_lora(final, recipe, init=False)
        final.load_state_dict(state)
        save_lora_final(final, tokenizer, out / "final", save_dtype)  # peft: merged and re-quantized, or adapter/
        del final
    del state
    accelerator.wait_for_everyone()
    result = {"steps": step, "wall_time_s": None, "quantized_layers": len(report.layers) if report else 0, "frozen_layers": frozen}
    if valid_set is not None:
        from .eval_cli import load_model_dir

        ev = recipe.eval
        final, _ = load_model_dir(out / "final", "float32", str(accelerator.device))  # exact weights, fp32 arithmetic
        result["student"] = perplexity(final, valid_set, ev.batch_size, ev.max_batches, teacher=teacher, accelerator=accelerator, desc="eval final/")
        if teacher is not None:
            result["teacher"] = perplexity(teacher, valid_set, ev.batch_size, ev.max_batches, accelerator=accelerator, desc="eval teacher")
        if main:
            print(_eval_line(result))
    if main:
        result["wall_time_s"] = time.perf_counter() - t_start
        (out / "eval.json").write_text(json.dumps(result, indent=1))
        if accelerator.trackers:
            try:
                accelerator.log({f"final/{k}_ppl": v["ppl"] for k, v in result.items() if isinstance(v, dict)}, step=step)
            except Exception as e:
                warnings.warn(f"wandb logging failed: {e}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def _eval_line(result: dict) -> str:
    s = result["student"]
    line = f"validation perplexity: student {s['ppl']:.3f} over {s['tokens']} tokens"
    if "teacher" in result:
        line += f", teacher {result['teacher']['ppl']:.3f} (student/teacher {s['ppl'] / result['teacher']['ppl']:.4f})"
    return line
