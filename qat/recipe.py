"""Recipes: a typed schema for the YAML, ``dotted.key=value`` overrides, and errors with key paths.

A recipe is validated completely before any model loads. Every problem is reported as
``<dotted.key.path>: <what was expected>`` through ``RecipeError``; the CLI turns it into exit
code 2 with no traceback. Sections map 1:1 to the objects the loop builds.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .quant.scheme import SUPPORTED_BITS, QuantScheme


class RecipeError(ValueError):
    """A recipe problem, already phrased as ``key.path: what was expected``."""


class UsageError(RecipeError):
    """A command-line problem (not the recipe's), phrased as ``--flag: what was expected``."""


class _Section(BaseModel):
    # extra keys are errors; floats must be finite (lr=.inf would "validate" and train to NaN)
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v, info):
        # pydantic's lax mode takes `true` as 1 for an int or float field (group_size: true -> 1)
        if isinstance(v, bool) and _is_numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, not a boolean")
        return v


def _is_numeric(annotation) -> bool:
    """int or float (possibly optional), and not bool."""
    args = get_args(annotation)
    if args:
        return bool not in args and any(_is_numeric(a) for a in args)
    return annotation in (int, float)


def _as_list(v):
    return [v] if isinstance(v, str) else v


# -- sections ------------------------------------------------------------------------------
class ModelSection(_Section):
    path: str | None = Field(None, description="HF hub id or local directory of a pretrained model")
    config: dict[str, Any] | None = Field(None, description="inline config (with model_type) for a from-scratch model")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="master weights of the student")
    save_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="dtype of final/ (default: dtype)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of model.path, for the student, the default teacher and the tokenizer")
    trust_remote_code: bool = Field(False, description="run the Python code a hub model ships (the run prints that it is on); every load of the recipe's models honours it")
    attn_implementation: str | None = Field(
        None, description="passed to from_pretrained (sdpa, eager, flash_attention_2, ...); null: what transformers chooses for the "
        "model (sdpa where the family supports it, eager for e.g. Gemma-2)"
    )

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.config is None):
            raise ValueError("set exactly one of model.path (pretrained) or model.config (from scratch)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a model_type (e.g. llama)")
        return self


class TokenizerSection(_Section):
    path: str | None = Field(None, description="defaults to model.path")
    train_vocab_size: int | None = Field(None, ge=257, description="train a byte-level BPE on the training data")


class TeacherSection(_Section):
    path: str | None = Field(None, description="defaults to model.path (the original weights)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="dtype of the frozen teacher (the original weights)")


def grid_defaults(bits: int) -> dict:
    """What ``null`` means for the grid keys, by bit width: the best of the llama-small runs
    (benchmarks/RESULTS.md; ppl/FP, MSE scale init in all). At 2 bits ParetoQ's SEQ grid
    (W2g64 1.2773 / 1.2832 over 2 seeds vs 1.3078 / 1.3141 on the asymmetric integer grid, itself
    1.40 vs 1.51 symmetric in a 30-step screen) with LSQ-trained scales (1.509 vs 1.522 recomputed);
    at 3 bits and up a symmetric integer grid whose scales are recomputed every step (W4g128
    1.0225 / 1.0253 over 2 seeds vs 1.0296 / 1.0284 with LSQ; W3g128 1.0690 vs 1.0745)."""
    return {"grid": "seq" if bits <= 2 else "int", "symmetric": bits > 2, "learnable": bits <= 2}


GRID_KEYS = ("grid", "symmetric", "learnable")  # null: resolved by bit width (grid_defaults)


def _resolve_grid(section, bits: int, fallback=None) -> None:
    """Fill the null grid keys of ``section`` (QuantSection or QuantOverride) from ``fallback`` (the
    quant section, for an override; its own values, not yet resolved) where that sets them, else
    by ``bits``. A section's own keys beat inherited ones: its own ``symmetric`` chooses an integer
    grid, its own ``grid: seq`` an unsigned (asymmetric) one whatever symmetry it would inherit.
    A recipe that sets ``symmetric`` has chosen an integer grid, so a null ``grid`` is then
    ``int``; on SEQ's grid a null ``symmetric`` is false (its codes are unsigned). The values as
    given are kept in ``section._given`` (a recipe derived for another bit width starts from them)."""
    section._given = {k: getattr(section, k) for k in GRID_KEYS}

    def inherited(key):
        return getattr(fallback, key) if fallback is not None else None

    default = grid_defaults(bits)
    grid, symmetric = section.grid, section.symmetric
    if grid is None and symmetric is not None:
        grid = "int"  # the section's own symmetry choice beats a grid it would inherit
    elif grid is None:
        grid, symmetric = inherited("grid"), inherited("symmetric")
        if grid is None:
            grid = default["grid"] if symmetric is None else "int"
    elif symmetric is None and grid != "seq":
        symmetric = inherited("symmetric")
    if symmetric is None:
        symmetric = False if grid == "seq" else default["symmetric"]
    if grid == "seq" and symmetric:
        raise ValueError(_SEQ_SYMMETRIC)
    learnable = section.learnable if section.learnable is not None else inherited("learnable")
    section.grid, section.symmetric = grid, symmetric
    section.learnable = default["learnable"] if learnable is None else learnable


_SEQ_SYMMETRIC = "symmetric: true does not go with grid: seq (SEQ's levels are symmetric about 0 by construction, on unsigned codes)"


class QuantOverride(_Section):
    """One entry of ``quant.overrides``: the layers whose names match ``pattern`` get this scheme."""

    _given: dict = PrivateAttr(default_factory=dict)
    pattern: str = Field(description="regex (re.search) on qualified layer names; the first entry that matches a layer wins")
    bits: int | None = Field(None, description="null: quant.bits")
    group_size: int | None = Field(None, gt=0, description="null: quant.group_size")
    per_channel: bool = Field(False, description="true: one scale per output channel (no groups)")
    symmetric: bool | None = Field(None, description="null: quant.symmetric, or the default of this override's bits when that is null too")
    learnable: bool | None = Field(None, description="null: quant.learnable, or the default of this override's bits when that is null too")
    grid: Literal["int", "seq"] | None = Field(None, description="null: quant.grid, or the default of this override's bits when that is null too")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        if v is not None and v not in SUPPORTED_BITS:
            raise ValueError(f"must be one of {list(SUPPORTED_BITS)}")
        return v

    @model_validator(mode="after")
    def _seq_is_asymmetric(self):
        if self.grid == "seq" and self.symmetric:
            raise ValueError(_SEQ_SYMMETRIC)
        return self


class QuantSection(_Section):
    _given: dict = PrivateAttr(default_factory=dict)
    bits: int = Field(4, description="code bits per weight: 2, 3, 4 or 8")
    group_size: int | None = Field(128, gt=0, description="null = per-channel")
    # null keys take the best of the llama-small sweeps at the bit width (grid_defaults)
    symmetric: bool | None = Field(
        None,
        description="null: false on SEQ's grid (the 2-bit default), true at 3 bits and up; setting it chooses an integer grid "
        "(asymmetric was 1.40 vs 1.51 ppl/FP symmetric at W2g64 on llama-small)",
    )
    scale_init: Literal["minmax", "mse"] = Field("mse", description="mse: per-group clip ratio searched to minimise the weight error; minmax: the group's full range")
    learnable: bool | None = Field(None, description="null: learnable (LSQ) scales at 2 bits, recomputed every step at 3 bits and up")
    grid: Literal["int", "seq"] | None = Field(
        None,
        description="int: integer zero-point (the grid of compressed-tensors / GPTQ checkpoints); seq: ParetoQ's stretched elastic grid, "
        "levels (q - (2^b - 1) / 2) * s, no zero level (packed exports: a symmetric grid of one bit more, half the scale). null: seq at 2 bits unless quant.symmetric "
        "is set (W2g64 on llama-small: 1.2773 / 1.2832 vs 1.3078 / 1.3141 ppl/FP over 2 seeds), int otherwise",
    )
    lsq_grad_scale: bool = Field(False, description="with learnable: multiply the scales' gradient by LSQ's 1 / sqrt(group_size * qmax)")
    act_bits: Literal[8] | None = Field(None, description="8: per-token dynamic symmetric int8 fake-quant of the quantized layers' inputs (W4A8); null: weights only")
    kernel: Literal["auto", "eager", "compile"] = Field(
        "auto", description="fake-quant implementation: auto = compiled (fused) on CUDA, eager elsewhere; same values bit for bit"
    )
    recompute: bool = Field(
        True, description="recompute each layer's fake-quantized weight in backward instead of keeping it: no weight-sized tensor "
        "per layer in the activation memory, for one more fake-quant pass per step; false keeps it (faster, more memory)"
    )
    targets: list[str] | None = Field(None, description="regexes (re.search on qualified names) of the Linear layers to quantize; null: every Linear and fused MoE expert tensor inside the transformer blocks (layers.N. / h.N. / blocks.N.) but the MoE routers (.gate, .router, .shared_expert_gate), so lm_head, embeddings and routers stay in full precision")
    ignore: list[str] = Field([], description="regexes of layers to leave in full precision")
    overrides: list[QuantOverride] = Field([], description="mixed precision: a list of {pattern, bits, group_size, per_channel, symmetric, learnable, grid}, first match wins; a key left out takes the recipe's value, or where that is null too the default of the override's own bits")
    start_step: int = Field(
        0, ge=0, description="fake-quant off (plain fine-tuning / KD) before this optimizer step; at it the qparams are re-initialised from the weights"
    )
    init_from: str | None = Field(
        None, description="a `qat ptq` (or `qat train`) run directory: its final/ quantized weights (and qparams, when on their grid) are the starting point"
    )

    _lists = field_validator("targets", "ignore", mode="before")(_as_list)

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        if v not in SUPPORTED_BITS:
            raise ValueError(f"must be one of {list(SUPPORTED_BITS)}")
        return v

    @model_validator(mode="after")
    def _grid_by_bits(self):
        # resolved here, overrides included, so that a run's recipe.yaml names every layer's grid
        for o in self.overrides:
            _resolve_grid(o, o.bits or self.bits, self)
        _resolve_grid(self, self.bits)
        return self

    def as_given(self) -> dict:
        """The section as the recipe gave it: the grid keys it left null are null again (what a
        recipe derived for another bit width, e.g. by ``qat analyze bits``, must start from)."""
        d = self.model_dump(mode="json")
        d.update(self._given or {})
        for o, od in zip(self.overrides, d["overrides"]):
            od.update(o._given or {})
        return d

    def scheme(self) -> QuantScheme:
        return QuantScheme(
            self.bits, self.group_size, self.symmetric, self.scale_init, self.learnable, self.act_bits, self.lsq_grad_scale, self.grid
        )

    def layer_schemes(self) -> list[tuple[str, QuantScheme]]:
        base = self.scheme()
        out = []
        for o in self.overrides:
            group = None if o.per_channel else (o.group_size or base.group_size)
            out.append(
                (
                    o.pattern,
                    QuantScheme(
                        o.bits or base.bits,
                        group,
                        o.symmetric,
                        base.scale_init,
                        o.learnable,
                        base.act_bits,
                        base.lsq_grad_scale,
                        o.grid,
                    ),
                )
            )
        return out


def default_freeze_policy(quant: "QuantSection | None", peft) -> str:
    """What a null ``freeze.policy`` means: ov-freeze at 4 bits and up, none below (and without a
    quant section, and with LoRA-QAT). From the llama-small runs (benchmarks/RESULTS.md, ppl/FP
    over 2 seeds): at W4g128 ov-freeze from step 0 gave 1.0218 / 1.0223 and KL to
    the teacher 0.056 / 0.057 against 1.0225 / 1.0253 and 0.063 / 0.065 without; at W3g128 it was
    within noise (1.0702 vs 1.0690 / 1.0724), at W2g64 worse (1.5737 vs 1.5092, 30-step screen)."""
    return "ov-freeze" if quant is not None and quant.bits >= 4 and peft is None else "none"


class FreezeSection(_Section):
    policy: Literal["none", "ov-freeze", "custom"] | None = Field(
        None,
        description="null: ov-freeze at 4 bits and up (none on models without o_proj / v_proj), none below 4 bits, "
        "without quant and with peft (default_freeze_policy)",
    )
    patterns: list[str] | None = Field(None, description="regexes of the layers policy custom freezes, or that adapt ov-freeze to another family (OPT: ['\\.v_proj$', '\\.out_proj$'])")
    start_step: int = Field(0, ge=0, description="freeze at this optimizer step (the layers train under fake-quant until then); 0: from the start")
    scales: bool = Field(True, description="false: freeze the weights only, the learnable scales (quant.learnable) keep training")

    _lists = field_validator("patterns", mode="before")(_as_list)

    # the policy came from default_freeze_policy: on a model without its layers it becomes none
    _by_default: bool = PrivateAttr(False)

    @model_validator(mode="after")
    def _custom(self):
        if self.policy == "custom" and not self.patterns:
            raise ValueError("freeze.policy 'custom' needs freeze.patterns (a list of regexes)")
        if self.policy in ("none", None) and self.patterns:
            raise ValueError(f"freeze.patterns given but freeze.policy is {repr(self.policy) if self.policy else 'null'} (set it to custom or ov-freeze)")
        return self


class TeacherCacheSection(_Section):
    """The teacher's top-k logits, computed once before training (qat/distill/teacher_cache.py)."""

    top_k: int = Field(64, gt=0, description="teacher logits kept per token (the KD loss renormalises the teacher over them)")
    dir: str | None = Field(None, description="cache directory (default: <output_dir>/teacher-cache); reused when its fingerprint matches")
    batch_size: int = Field(8, gt=0, description="blocks per teacher forward during the precompute")
    shard_blocks: int = Field(256, gt=0, description="blocks per shard file (the unit of resuming)")


class DistillSection(_Section):
    loss: Literal["forward_kl", "reverse_kl", "jsd", "cakld"] = Field("forward_kl", description="forward_kl, reverse_kl, jsd, or cakld (confidence-aware KL: c * reverse + (1 - c) * forward per token, c the teacher's top probability)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of student and teacher (the KD term is scaled by T^2)")
    kd_weight: float = Field(1.0, ge=0, description="loss = kd_weight * T^2 * KD + ce_weight * CE")
    ce_weight: float = Field(0.0, ge=0, description="weight of the cross-entropy on the real next tokens")
    chunk_tokens: int | None = Field(
        256, gt=0, description="tokens per chunk of the KD/CE loss (float32 copies of one chunk at a time); null: all tokens at once"
    )
    teacher_cache: TeacherCacheSection | None = Field(
        None, description="precompute the teacher's top-k logits once and train without loading the teacher"
    )


class GenerateSection(_Section):
    """Data-free distillation data (LLM-QAT, arXiv 2305.17888): sequences sampled from the teacher."""

    count: int = Field(1024, gt=0, description="sequences to generate")
    length: int | None = Field(None, gt=1, description="tokens per sequence (default: data.seq_len)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the teacher")
    top_k: int | None = Field(50, gt=0, description="null: sample from the full distribution")
    seed: int = Field(0, description="sampling seed")
    batch_size: int = Field(32, gt=0, description="sequences per generate call (and per cache shard)")


class DataSection(_Section):
    source: Literal["files", "hf", "python-stdlib", "teacher-generated"] = Field("files", description="files (local text / json / jsonl / parquet, globs, .gz), hf (load_dataset(name, config, split)), python-stdlib (the Python standard library's source), teacher-generated (sequences sampled from the teacher)")
    files: list[str] | None = Field(None, description="local text/json/jsonl/parquet files or globs (.gz ok)")
    name: str | None = Field(None, description="load_dataset path or hub name (source: hf)")
    config: str | None = Field(None, description="the hf dataset's configuration name")
    split: str = Field("train", description="the hf split to train on")
    format: Literal["auto", "text", "json", "parquet"] = Field("auto", description="format of data.files: auto (from the extension), text, json, parquet")
    text_field: str = Field("text", description="the column holding the text (json, parquet, hf)")
    doc_separator: str | None = Field(None, description="split text samples into documents on this string")
    valid_files: list[str] | None = Field(None, description="validation files (same format rules as data.files)")
    valid_split: str | None = Field(None, description="validation split of an hf dataset")
    valid_fraction: float = Field(0.0, ge=0, lt=1, description="a seeded fraction of the training documents held out for validation")
    seq_len: int = Field(512, gt=1, description="tokens per block")
    packing: bool = Field(True, description="true: documents joined with eos and cut into full blocks; false: one padded row per document")
    max_train_tokens: int | None = Field(None, gt=0, description="training token budget (the first blocks are kept); null: all")
    max_valid_tokens: int | None = Field(None, gt=0, description="validation token budget; null: all")
    generate: GenerateSection = GenerateSection()
    cache_dir: str | None = Field(None, description="teacher-generated data cache (default: <output_dir>/generated-data)")

    _lists = field_validator("files", "valid_files", mode="before")(_as_list)

    @model_validator(mode="after")
    def _source(self):
        if self.source == "files" and not self.files:
            raise ValueError("data.source 'files' needs data.files")
        if self.source == "hf" and not self.name:
            raise ValueError("data.source 'hf' needs data.name")
        if self.source != "files" and self.files:
            raise ValueError(f"data.files is only for data.source 'files' (source is {self.source!r})")
        if self.source == "teacher-generated" and self.valid_fraction > 0:
            raise ValueError("data.valid_fraction: not for data.source 'teacher-generated' (use data.valid_files)")
        if self.source != "hf" and self.valid_split:
            raise ValueError("data.valid_split is only for data.source 'hf' (use valid_files or valid_fraction)")
        held_out = [bool(self.valid_files), bool(self.valid_split), self.valid_fraction > 0]
        if sum(held_out) > 1:
            raise ValueError("set at most one of data.valid_files, data.valid_split, data.valid_fraction")
        return self


class TrainSection(_Section):
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field("adamw", description="adamw, or bitsandbytes' adamw_8bit / paged_adamw_8bit (the bnb extra)")
    lr: float = Field(3e-4, gt=0, description="tuned for QAT of small models (llama-small, 17M); large models want less (the 7B recipes use 2e-5)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never on 1-D tensors and quantization parameters)")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="learning-rate schedule after the warmup: constant, linear, cosine")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the schedule's final learning rate as a fraction of train.lr")
    max_steps: int | None = Field(None, ge=0, description="optimizer steps (exactly one of max_steps and epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the training blocks (exactly one of max_steps and epochs)")
    micro_batch_size: int = Field(8, gt=0, description="blocks per process per forward; global batch = micro_batch_size x processes x grad_accum")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    grad_clip: float | None = Field(1.0, gt=0, description="global gradient-norm clip; null: none")
    seed: int = Field(0, description="seed of the data order, initialisation and sampling")
    mixed_precision: Literal["no", "bf16", "fp16"] | None = Field(
        None, description="null: the launch configuration's (accelerate launch --mixed_precision / its config file), else no; "
        "set in both and different: the run stops naming both"
    )
    collective_timeout_s: int | None = Field(
        None, gt=0, description="seconds a process waits at a collective (the process group's timeout): it must cover the "
        "longest step only the main process does (reading the models, writing final/); null: 1800 plus 1 s per 10 MB of "
        "model.path's weight files; a rank that waits longer says what it waited for"
    )
    activation_checkpointing: bool = Field(False, description="recompute each block's activations in the backward (less memory, about a third more compute)")
    compile: bool = Field(False, description="torch.compile the student (inductor) after Accelerate wraps it; pays off on GPUs")
    log_every: int = Field(10, gt=0, description="steps per metrics.jsonl row")
    max_bad_steps: int = Field(3, ge=0, description="steps with a non-finite loss or gradient skipped before the run stops")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _length(self):
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.max_steps or train.epochs")
        return self


class PeftSection(_Section):
    """LoRA on the fake-quant student (``qat/train/lora.py``)."""

    mode: Literal["separate", "merged"] = Field(
        "separate",
        description="separate: frozen quantized base + full-precision adapter (QLoRA style, final/adapter/); "
        "merged: the quantizer sees W + (alpha/r) B A, final/ is the merged, re-quantized model",
    )
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (the adapter is scaled by alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (0 with peft.mode merged)")
    target_modules: list[str] | None = Field(None, description="regexes on layer names (default: every quantized, non-frozen layer)")
    init: Literal["gaussian", "loftq", "qera"] = Field("gaussian", description="adapter start (separate mode): gaussian (peft's default), loftq (LoftQ-style alternation), qera (QERA's low-rank reconstruction of the quantization error on calibration tokens)")
    loftq_iters: int = Field(1, gt=0, description="alternations of peft.init loftq")
    init_tokens: int = Field(16384, gt=0, description="calibration tokens (training data) for init: qera")

    _lists = field_validator("target_modules", mode="before")(_as_list)

    @model_validator(mode="after")
    def _merged(self):
        if self.mode == "merged" and self.dropout > 0:
            raise ValueError("peft.dropout: must be 0 with peft.mode 'merged' (the adapter is part of the weight)")
        if self.mode == "merged" and self.init != "gaussian":
            raise ValueError("peft.init: loftq/qera initialise the adapter of peft.mode 'separate'; 'merged' starts at W (gaussian)")
        return self


class EvalSection(_Section):
    every: int = Field(0, ge=0, description="validate every N steps (0: only at the end)")
    batch_size: int = Field(8, gt=0, description="blocks per validation forward")
    max_batches: int | None = Field(None, gt=0, description="validation batches per evaluation; null: the whole validation set")


class TrackingSection(_Section):
    wandb_project: str | None = Field(None, description="null: no wandb (metrics.jsonl is always written)")
    run_name: str | None = Field(None, description="the wandb run's name")
    mode: Literal["online", "offline", "disabled"] = Field("offline", description="wandb mode: online, offline (sync later from <output_dir>/wandb), disabled; WANDB_MODE wins")
    tags: list[str] = Field([], description="wandb tags")
    entity: str | None = Field(None, description="wandb entity (team or user)")


class CheckpointSection(_Section):
    every: int = Field(0, ge=0, description="save every N optimizer steps (0: never)")
    keep: int = Field(2, gt=0, description="how many of the newest checkpoints are kept")
    resume: str | None = Field(None, description="'auto' (newest complete checkpoint) or a checkpoint dir")


PTQ_METHODS = ("rtn", "rtn-mse", "gptq", "awq", "qera-exact", "qera-approx", "nf4", "block-ap")


class GPTQOptions(_Section):
    damp: float = Field(0.01, gt=0, description="dampening: this fraction of mean(diag H) is added to diag H")
    block_size: int = Field(128, gt=0, description="columns per lazy-batch update")
    act_order: bool = Field(False, description="visit columns by decreasing diag(H) (implies static groups)")
    static_groups: bool = Field(False, description="group qparams from the original weight, before any update")
    true_sequential: bool = Field(True, description="inside a block, calibrate each layer group on the already-quantized ones")


class AWQOptions(_Section):
    grid: int = Field(20, gt=0, description="alpha grid 0, 1/grid, ..., (grid-1)/grid for s = mean|x|^alpha")
    search_tokens: int = Field(65536, gt=0, description="calibration tokens the scale search runs the block on")
    clip: bool = Field(True, description="weight clipping search after scaling")
    clip_grid: int | None = Field(None, gt=0, description="clip ratios searched; null: 20 (28 on quant.grid seq)")
    clip_min: float | None = Field(None, gt=0, le=1, description="smallest clip ratio searched; null: 0.5 (0.3 on quant.grid seq)")


class QERAOptions(_Section):
    rank: int = Field(32, gt=0, description="rank of the low-rank correction (LoRA r)")
    base: Literal["rtn", "gptq"] = Field("rtn", description="the quantized base the correction is added to")
    damp: float = Field(1e-6, gt=0, description="R + damp * mean(diag R) * I when R is singular")


class BlockAPOptions(_Section):
    epochs: int = Field(2, gt=0, description="passes over the calibration set per decoder block")
    # set on llama-tiny W2g64 (4,096 calibration tokens): ppl/FP 2.54 / 2.25 / 1.86 / 2.09 at weight_lr 0 / 1e-4 / 1e-3 / 3e-3
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the scales (and zero-points), cosine to 0 in each block")
    weight_lr: float = Field(1e-3, ge=0, description="AdamW learning rate of the weights (0: scales only)")


class PTQSection(_Section):
    methods: list[Literal["rtn", "rtn-mse", "gptq", "awq", "qera-exact", "qera-approx", "nf4", "block-ap"]] = Field(
        ["rtn", "gptq", "awq", "qera-exact"], description="the PTQ baselines `qat compare` runs"
    )
    calib_tokens: int | None = Field(
        None, ge=0, description="default: the QAT run's budget, train.max_steps x micro_batch_size x grad_accum x seq_len, capped by the data"
    )
    batch_size: int = Field(8, gt=0, description="calibration sequences per forward")
    device: str | None = Field(None, description="default: cuda if available, else cpu")
    offload: Literal["auto", "always", "never"] = Field(
        "auto", description="keep the model on the CPU and move one block at a time to the device (auto: when it does not fit)"
    )
    diag_tokens: int = Field(32768, gt=0, description="held-out validation tokens for the per-layer output error")
    expert_min_tokens: int = Field(
        16, ge=0, description="MoE: an expert routed fewer calibration tokens than this is quantized with RTN instead (counted in the report)"
    )
    gptq: GPTQOptions = GPTQOptions()
    awq: AWQOptions = AWQOptions()
    qera: QERAOptions = QERAOptions()
    block_ap: BlockAPOptions = BlockAPOptions()

    _lists = field_validator("methods", mode="before")(_as_list)


class Recipe(_Section):
    output_dir: str = Field(description="the run directory (checkpoints, final/, metrics.jsonl, eval.json); qat writes nothing outside it")
    model: ModelSection

    @field_validator("output_dir")
    @classmethod
    def _expand_home(cls, v: str) -> str:
        return os.path.expanduser(v)  # `output_dir=~/runs/x` is the home directory's runs/x, not ./~/runs/x

    tokenizer: TokenizerSection = TokenizerSection()
    teacher: TeacherSection | None = TeacherSection()
    quant: QuantSection | None = QuantSection()
    peft: PeftSection | None = None
    freeze: FreezeSection = FreezeSection()
    distill: DistillSection = DistillSection()
    data: DataSection
    train: TrainSection
    eval: EvalSection = EvalSection()
    tracking: TrackingSection = TrackingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    ptq: PTQSection = PTQSection()

    @model_validator(mode="after")
    def _cross(self):
        if self.teacher is not None and self.teacher.path is None and self.model.path is None:
            raise ValueError("teacher: a from-scratch model (model.config) has no teacher; set teacher: null or teacher.path")
        if self.teacher is None and self.distill.ce_weight == 0:
            raise ValueError("distill.ce_weight: must be > 0 when teacher is null (nothing else to learn from)")
        if self.teacher is not None and self.distill.kd_weight == 0 and self.distill.ce_weight == 0:
            raise ValueError("distill: kd_weight and ce_weight are both 0")
        if self.teacher is None and self.distill.teacher_cache is not None:
            raise ValueError("distill.teacher_cache: needs a teacher (teacher is null)")
        if self.distill.teacher_cache is not None and self.distill.loss in ("reverse_kl", "cakld"):
            raise ValueError(f"distill.loss: {self.distill.loss} is infinite against a top-k teacher (zero outside its k ids); use forward_kl or jsd with distill.teacher_cache")
        if self.peft is not None and self.quant is None:
            raise ValueError("peft: LoRA-QAT needs a quant section (quant is null)")
        if self.freeze.policy is None:
            self.freeze.policy = default_freeze_policy(self.quant, self.peft)
            self.freeze._by_default = True
        if self.freeze.policy == "none" and (self.freeze.start_step or not self.freeze.scales):
            raise ValueError("freeze.policy: freeze.start_step / freeze.scales need a freeze policy (policy is 'none')")
        if not self.freeze.scales and (self.quant is None or not self.quant.learnable):
            raise ValueError("freeze.scales: false (weights frozen, scales trained) needs quant.learnable: true")
        if self.peft is not None and (self.freeze.start_step or (self.quant is not None and self.quant.start_step)):
            raise ValueError("peft: quant.start_step / freeze.start_step are not supported with LoRA-QAT")
        if self.data.source == "teacher-generated" and self.teacher_path is None:
            raise ValueError("data.source: 'teacher-generated' needs a teacher (teacher.path or a pretrained model.path)")
        if self.tokenizer.path is None and self.tokenizer.train_vocab_size is None and self.model.path is None:
            raise ValueError("tokenizer: a from-scratch model needs tokenizer.path or tokenizer.train_vocab_size")
        return self

    # -- derived ------------------------------------------------------------------------
    @property
    def teacher_path(self) -> str | None:
        return None if self.teacher is None else (self.teacher.path or self.model.path)

    @property
    def tokenizer_path(self) -> str | None:
        return self.tokenizer.path or (None if self.tokenizer.train_vocab_size else self.model.path)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- loading -------------------------------------------------------------------------------
class _RecipeLoader(yaml.SafeLoader):
    """The safe loader (plain data only: no ``!!python/...`` tags), refusing duplicate keys,
    which the stock loader silently resolves to the last one."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _RecipeLoader.construct_mapping)
# YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as booleans, which turns
# ``mixed_precision: no`` (Accelerate's own spelling) into False.
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


MAX_NODES = 100_000  # a recipe is a few hundred values; YAML aliases can make a 1 KB file expand to billions
MAX_MESSAGE = 400  # characters of one problem line (a value echoed back is cut, not the key path)


def _yaml_load(text_or_stream):
    data = yaml.load(text_or_stream, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    _check_size(data)
    return data


def _check_size(data) -> None:
    """Refuse a document whose aliases expand past ``MAX_NODES`` values (a "billion laughs"
    recipe), counting every expansion, before anything walks or copies it."""
    count, stack = 0, [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise RecipeError(f"<recipe>: expands to more than {MAX_NODES:,} values (YAML aliases?); a recipe is a few hundred")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _yaml_problem(e: yaml.YAMLError) -> str:
    msg = " ".join(str(e).split())
    if isinstance(e, yaml.constructor.ConstructorError) and "constructor for the tag" in msg:
        return f"{msg} (recipes are read with a safe YAML loader: tags that build Python objects are refused)"
    return msg


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not k for k in key.split(".")):
        raise RecipeError(f"override {item!r}: expected dotted.key=value")
    try:
        value = _yaml_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise RecipeError(f"{key}: override value {raw!r} is not valid YAML: {_yaml_problem(e)}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            elif not isinstance(nxt, dict):
                raise RecipeError(f"{'.'.join(keys[: i + 1])}: is a value, not a section; cannot set {'.'.join(keys)}")
            node = nxt
        node[keys[-1]] = value
    return data


def _section_of(annotation):
    """The section model inside ``X``, ``X | None`` (None for a plain value)."""
    for a in (annotation, *get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def schema_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """Every dotted key of the recipe schema (``train.lr``, ``quant.bits``, ...)."""
    keys = []
    for name, field in (model or Recipe).model_fields.items():
        sub = _section_of(field.annotation)
        keys.append(prefix + name)
        if sub is not None:
            keys += schema_keys(sub, f"{prefix}{name}.")
    return keys


def _did_you_mean(loc: str) -> str:
    """`` (did you mean train.lr?)`` for a misspelt or misplaced key, else ``""``."""
    import difflib

    keys = schema_keys()
    parent, _, leaf = loc.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(loc, siblings, n=1, cutoff=0.75)
    if not close:  # the right name in the wrong section (`lr` at the top, `quant.lr`)
        close = [k for k in keys if k.rpartition(".")[2] == leaf]
    if not close:
        close = difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in keys], n=1, cutoff=0.8)
        close = [k for k in keys if close and k.rpartition(".")[2] == close[0]]
    return f" (did you mean {' or '.join(close[:2])}?)" if close else ""


def _format_error(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    msg = err["msg"].removeprefix("Value error, ")
    named = re.match(r"([a-z_]+(?:\.[a-z_0-9]+)*): (.*)", msg, re.S)
    if not loc and named:  # a check across sections names its key first
        loc, msg = named.groups()
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _did_you_mean(loc)
    elif err["type"] == "missing":
        msg = "required key is missing"
    got = err.get("input")
    shown = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
    line = f"{loc or '<recipe>'}: {msg}{shown}"
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 15] + " ... (cut)"


def validate(data: Any) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"<recipe>: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError("\n".join(_format_error(err) for err in e.errors())) from None


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True) -> Recipe:
    """Read YAML (safe loader), apply overrides, validate the schema and the local paths."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"<recipe>: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:  # a stream: YAML errors then name the file
            data = _yaml_load(f) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"<recipe>: {path} is not valid YAML: {_yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"<recipe>: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"<recipe>: expected a mapping of sections, got {type(data).__name__}")
    recipe = validate(apply_overrides(data, list(overrides)))
    if check_files:
        check_paths(recipe)
    return recipe


def _looks_local(p: str) -> bool:
    return p.startswith((".", "/", "~")) or p.count("/") > 1


def check_paths(recipe: Recipe) -> None:
    """Missing local files fail here, before anything loads."""
    problems = []
    for key, p in (
        ("model.path", recipe.model.path),
        ("teacher.path", recipe.teacher.path if recipe.teacher else None),
        ("tokenizer.path", recipe.tokenizer.path),
    ):
        if p and _looks_local(p):
            d = Path(p).expanduser()
            if not d.exists():
                problems.append(f"{key}: no such model directory: {p}")
            elif key != "tokenizer.path" and not (d / "config.json").is_file():
                problems.append(f"{key}: {p} is not a Hugging Face model directory (no config.json)")
    d = recipe.data
    for key, files in (("data.files", d.files if d.source == "files" else None), ("data.valid_files", d.valid_files)):
        for f in files or []:
            if not glob.glob(os.path.expanduser(f), recursive=True):
                problems.append(f"{key}: no file matches {f!r}")
    if d.source == "hf" and d.name and _looks_local(d.name) and not Path(d.name).expanduser().exists():
        problems.append(f"data.name: no such local dataset: {d.name}")
    init_from = recipe.quant.init_from if recipe.quant is not None else None
    if init_from is not None:
        run = Path(init_from).expanduser()
        if not (run / "final" / "qat_quant.json").is_file() and not (run / "qat_quant.json").is_file():
            problems.append(f"quant.init_from: {init_from} is not a finished qat run directory (no final/qat_quant.json)")
    resume = recipe.checkpoint.resume
    if resume not in (None, "auto"):
        if not Path(resume).is_dir():
            problems.append(f"checkpoint.resume: expected 'auto' or a checkpoint directory, not found: {resume}")
        elif not (Path(resume) / "qat_state.json").is_file():
            problems.append(f"checkpoint.resume: {resume} is not a complete qat checkpoint (no qat_state.json)")
    problems += _output_dir_problems(recipe.output_dir)
    if problems:
        raise RecipeError("\n".join(problems))


def _output_dir_problems(output_dir: str) -> list[str]:
    """output_dir must be (or become) a directory: not a file, not under a file, no name longer
    than a file system takes."""
    out = Path(output_dir).expanduser()
    long = [part for part in out.parts if len(part.encode()) > 255]
    if long:
        return [f"output_dir: the path component {long[0][:40]}... is {len(long[0].encode())} bytes long; file systems take at most 255"]
    if out.exists() and not out.is_dir():
        return [f"output_dir: {output_dir} exists and is not a directory"]
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                return [f"output_dir: {parent} is a file, so {output_dir} cannot be created"]
            break
    return []


# -- the reference of every key, generated from this schema (docs/recipes.md) ----------------------
def _type_name(annotation) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " \\| ".join(_type_name(a) for a in rest) + " \\| `null`"
    if origin is dict:
        return "mapping"
    if origin in (list, tuple):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"list of {inner}" if origin is list else f"[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if origin is not None:  # X | Y
        return " \\| ".join(_type_name(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))


def _default_text(field) -> str:
    from pydantic_core import PydanticUndefined

    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


def reference_markdown() -> str:
    """Every recipe key with its type, default and description, section by section, and what the
    null grid and freeze keys mean at each bit width: the text of ``docs/recipes.md`` (the suite
    checks that the file is this function's output, so the reference cannot drift from the schema)."""
    out = ["# Recipe reference", "",
           "Generated from the recipe schema (`qat/recipe.py`) by `qat keys`; do not edit by hand. A recipe is YAML with",
           "these keys; `qat train RECIPE dotted.key=value ...` overrides any of them.", ""]

    def section(model, prefix: str, title: str) -> None:
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ").replace("``", "`")
        out.extend([f"## {title}", ""] + ([doc, ""] if doc and model is not Recipe else []))
        out.extend(["| key | type | default | meaning |", "|---|---|---|---|"])
        subs = []
        for name, field in model.model_fields.items():
            sub = _section_of(field.annotation)
            desc = (field.description or "").replace("|", "\\|")
            if sub is not None:
                subs.append((sub, f"{prefix}{name}."))
                desc = desc or f"see `{prefix}{name}` below"
            out.append(f"| `{prefix}{name}` | {_type_name(field.annotation)} | {_default_text(field)} | {desc} |")
        out.append("")
        for sub, p in subs:
            entries = get_origin(model.model_fields[p.rstrip(".").rpartition(".")[2]].annotation) is list
            section(sub, p, f"`{p.rstrip('.')}`" + (" (each entry of the list)" if entries else ""))

    section(Recipe, "", "Top level")
    out.extend(["## What null means, by bit width", "",
                "`quant.grid`, `quant.symmetric`, `quant.learnable` and `freeze.policy` left null take the value of the",
                "bit width (`grid_defaults`, `default_freeze_policy`; a `quant.overrides` entry by its own bits):", "",
                "| bits | grid | symmetric | learnable | freeze.policy |", "|---|---|---|---|---|"])
    for bits in sorted(SUPPORTED_BITS):
        d = grid_defaults(bits)
        freeze = default_freeze_policy(QuantSection(bits=bits), None)
        out.append(f"| {bits} | `{d['grid']}` | `{str(d['symmetric'] and d['grid'] != 'seq').lower()}` | `{str(d['learnable']).lower()}` | `{freeze}` |")
    return "\n".join(out) + "\n"
