"""The QAT loop on Accelerate, in one file: recipe -> student + teacher -> data -> steps -> final/.

Per optimizer step and micro-batch: teacher forward (no grad), student forward through the
fake-quant layers, loss = kd_weight * KD + ce_weight * CE over the shifted real tokens,
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
import resource
import shutil
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from .checkpoint import latest_checkpoint, read_state, save_checkpoint
from .data import build_datasets, load_documents, train_tokenizer
from .distill import ce_loss, kd_loss
from .eval import perplexity
from .final import save_final
from .quant import QuantReport, apply_freeze, quantize_model
from .quant.scheme import QuantConfigError
from .recipe import Recipe, RecipeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RUN_FILES = ("recipe.yaml", "metrics.jsonl", "eval.json", "checkpoints", "final", "tokenizer", "wandb")


# -- setup ---------------------------------------------------------------------------------
def check_output_dir(recipe: Recipe, overwrite: bool) -> Path | None:
    """Refuse to clobber another run; return the checkpoint to resume from, if any."""
    out = Path(recipe.output_dir)
    resume = recipe.checkpoint.resume
    if resume == "auto":
        return latest_checkpoint(out / "checkpoints")
    if resume is not None:
        return Path(resume)
    if not overwrite and any((out / f).exists() for f in ("recipe.yaml", "metrics.jsonl", "final", "checkpoints")):
        raise RecipeError(
            f"output_dir: {out} already holds a run; pass --overwrite to replace it or checkpoint.resume=auto to continue it"
        )
    return None


def load_tokenizer(recipe: Recipe, out: Path, accelerator):
    from transformers import AutoTokenizer

    if recipe.tokenizer_path is not None:
        return AutoTokenizer.from_pretrained(recipe.tokenizer_path, trust_remote_code=recipe.model.trust_remote_code)
    tok_dir = out / "tokenizer"  # trained once per run, reused on resume
    if accelerator.is_main_process and not (tok_dir / "tokenizer.json").exists():
        tok = train_tokenizer(load_documents(recipe.data, "train"), recipe.tokenizer.train_vocab_size)
        tok.save_pretrained(tok_dir)
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(tok_dir)


def model_config(recipe: Recipe, tokenizer):
    from transformers import AutoConfig

    m = recipe.model
    if m.path is not None:
        return AutoConfig.from_pretrained(m.path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    kw = dict(m.config)
    kw.setdefault("vocab_size", len(tokenizer))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        kw.setdefault(key, getattr(tokenizer, key))
    return AutoConfig.for_model(**kw)


def dry_run_quant(recipe: Recipe, config) -> None:
    """Apply quantization and freezing to a weightless (meta) copy of the model, so that bad
    patterns or group sizes fail before any weights load."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    try:
        build_student_quant(model, recipe)
    except QuantConfigError as e:
        section = "freeze" if "freeze" in str(e) else "quant"
        raise RecipeError(f"{section}: {e}") from None


def build_student_quant(model: nn.Module, recipe: Recipe) -> tuple[QuantReport | None, list[str]]:
    report = None
    if recipe.quant is not None:
        q = recipe.quant
        report = quantize_model(model, q.scheme(), q.targets, q.ignore, q.layer_schemes())
    frozen = apply_freeze(model, recipe.freeze.policy, recipe.freeze.patterns)
    return report, frozen


def load_models(recipe: Recipe, config):
    from transformers import AutoModelForCausalLM

    m = recipe.model
    kw = dict(trust_remote_code=m.trust_remote_code, attn_implementation=m.attn_implementation)
    if m.path is not None:
        student = AutoModelForCausalLM.from_pretrained(m.path, revision=m.revision, dtype=DTYPES[m.dtype], **kw)
    else:
        student = AutoModelForCausalLM.from_config(config, dtype=DTYPES[m.dtype], **kw)
    teacher = None
    if recipe.teacher is not None:
        teacher = AutoModelForCausalLM.from_pretrained(recipe.teacher_path, dtype=DTYPES[recipe.teacher.dtype], **kw)
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
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise RecipeError(f"train.optimizer: {t.optimizer} needs bitsandbytes (pip install 'qat[bnb]')") from None
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


def batch_of(blocks, idx: torch.Tensor, device) -> dict[str, torch.Tensor]:
    ids = blocks.input_ids[idx].to(device)
    mask = blocks.attention_mask[idx].to(device)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# -- logging -------------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl (always, main process) + the Accelerate trackers (wandb), which may fail."""

    def __init__(self, path: Path, accelerator, start_step: int):
        self.path, self.acc, self.tracker_ok = path, accelerator, bool(accelerator.log_with)
        if accelerator.is_main_process and path.exists():  # resume: drop rows past the checkpoint
            rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= start_step]
            path.write_text("".join(r + "\n" for r in rows))

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


def make_accelerator(recipe: Recipe, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import is_wandb_available

    tr = recipe.tracking
    use_wandb = tr.wandb_project is not None and tr.mode != "disabled" and is_wandb_available()
    if tr.wandb_project is not None and tr.mode != "disabled" and not use_wandb:
        warnings.warn("tracking.wandb_project is set but wandb is not installed (pip install 'qat[wandb]')")
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
    resume_from = check_output_dir(recipe, overwrite)
    accelerator = make_accelerator(recipe, out)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but Accelerate sees {accelerator.num_processes}: each would train "
            "alone. On a machine without GPUs set ACCELERATE_USE_CPU=1 (see launch/cpu-2proc.yaml)."
        )
    main = accelerator.is_main_process
    if main:
        if overwrite and resume_from is None:
            for f in RUN_FILES:
                p = out / f
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(recipe.to_yaml())
    set_seed(recipe.train.seed)
    t_start = time.perf_counter()

    # recipe -> tokenizer, config, a weightless check of quant/freeze -> data -> weights
    tokenizer = load_tokenizer(recipe, out, accelerator)
    config = model_config(recipe, tokenizer)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and recipe.data.seq_len > max_pos:
        raise RecipeError(f"data.seq_len: {recipe.data.seq_len} exceeds the model's max_position_embeddings {max_pos}")
    dry_run_quant(recipe, config)
    with accelerator.main_process_first():
        try:
            train_set, valid_set = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed)
        except ValueError as e:
            raise RecipeError(str(e)) from None
    t = recipe.train
    plan = BatchPlan(len(train_set), t.micro_batch_size, accelerator.num_processes, accelerator.process_index, t.seed)
    steps_per_epoch = plan.per_epoch // t.grad_accum
    if steps_per_epoch == 0:
        raise RecipeError(
            f"data: {len(train_set)} training blocks are fewer than one global batch "
            f"(train.micro_batch_size x processes x train.grad_accum = {t.micro_batch_size * accelerator.num_processes * t.grad_accum})"
        )
    max_steps = t.max_steps if t.max_steps is not None else math.ceil(t.epochs * steps_per_epoch)

    student, teacher = load_models(recipe, config)
    report, frozen = build_student_quant(student, recipe)
    if main:
        print(report.summary() if report else "no quantization (quant: null): plain fine-tuning")
        if frozen:
            print(f"frozen at their quantized values ({recipe.freeze.policy}): {len(frozen)} layers")
    if t.activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False
    optimizer = build_optimizer(student, recipe)
    student, optimizer = accelerator.prepare(student, optimizer)
    if teacher is not None:
        # sharded like the student under FSDP; elsewhere only placed (DDP refuses a model with
        # nothing to train, and a frozen teacher needs no gradient sync)
        from accelerate.utils import DistributedType

        teacher = accelerator.prepare_model(teacher, evaluation_mode=accelerator.distributed_type != DistributedType.FSDP)
    trainable = [p for p in student.parameters() if p.requires_grad]

    step = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        step = read_state(resume_from)["step"]
        if main:
            print(f"resumed from {resume_from} at step {step}")
    elif recipe.checkpoint.resume == "auto" and main:
        print("checkpoint.resume=auto: no complete checkpoint found, starting from step 0")
    init_tracking(recipe, accelerator, out)
    metrics = MetricsLog(out / "metrics.jsonl", accelerator, step)
    d = recipe.distill

    def loss_on(batch):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce = ce_loss(logits, batch["labels"])
        if teacher is None:
            return ce, None, ce
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kd = kd_loss(logits, t_logits, batch["labels"], d.loss, d.temperature)
        return d.kd_weight * kd + d.ce_weight * ce, kd, ce

    from tqdm.auto import tqdm

    pbar = tqdm(total=max_steps, initial=step, disable=not main, desc="qat train", dynamic_ncols=True)
    acc = torch.zeros(4, device=accelerator.device)  # loss, kd, ce, micro-batches since last log
    tokens, t_log, grad_norm = 0, time.perf_counter(), float("nan")
    student.train()
    while step < max_steps:
        t_step = time.perf_counter()
        lr = lr_at(step, recipe, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(t.grad_accum):
            epoch, idx = plan.indices(step * t.grad_accum + micro)
            batch = batch_of(train_set, idx, accelerator.device)
            with accelerator.accumulate(student):
                loss, kd, ce = loss_on(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(trainable, t.grad_clip or float("inf")).item()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            acc += torch.stack([loss.detach(), (kd if kd is not None else loss).detach(), ce.detach(), torch.ones_like(ce)])
            tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
        step += 1
        pbar.update(1)

        do_eval = valid_set is not None and recipe.eval.every and step % recipe.eval.every == 0 and step < max_steps
        if step % t.log_every == 0 or step == max_steps or do_eval:
            mean = accelerator.reduce(acc, reduction="mean")
            now = time.perf_counter()
            row = {
                "step": step,
                "epoch": epoch,
                "loss": (mean[0] / mean[3]).item(),
                "kd_loss": (mean[1] / mean[3]).item() if teacher is not None else None,
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
            metrics.log(row)
            pbar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
            acc.zero_()
            tokens, t_log = 0, time.perf_counter()
        if recipe.checkpoint.every and step % recipe.checkpoint.every == 0:
            save_checkpoint(accelerator, out / "checkpoints", step, {"max_steps": max_steps}, recipe.checkpoint.keep)
    pbar.close()

    # final/: on-grid weights in plain HF layout; eval.json: student (= final/) vs teacher
    accelerator.wait_for_everyone()
    if main:
        final = accelerator.unwrap_model(student)
        save_dtype = DTYPES[recipe.model.save_dtype or recipe.model.dtype]
        save_final(final, tokenizer, out / "final", save_dtype)
        result = {"steps": step, "wall_time_s": None, "quantized_layers": len(report.layers) if report else 0, "frozen_layers": frozen}
        if valid_set is not None:
            ev = recipe.eval
            teacher_model = accelerator.unwrap_model(teacher) if teacher is not None else None
            result["student"] = perplexity(final, valid_set, ev.batch_size, ev.max_batches, teacher=teacher_model, desc="eval student")
            if teacher_model is not None:
                result["teacher"] = perplexity(teacher_model, valid_set, ev.batch_size, ev.max_batches, desc="eval teacher")
            print(_eval_line(result))
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
