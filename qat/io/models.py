"""One loader for everything a run loads: the tokenizer, the model config, the student, the
teacher, and a saved model directory (``final/``, an export, any HF model dir).

``model.revision``, ``model.trust_remote_code`` and ``model.attn_implementation`` are honoured
by every load of the recipe's models (student, teacher, tokenizer), so a remote-code model that
trains also loads its own ``final/``.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..deps import require
from ..recipe import Recipe, RecipeError
from ..quant.apply import add_activation_quant
from .final import ADAPTER_DIR, load_quant_layers
from .rundir import first_line
from .weights import check_weight_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(recipe: Recipe, path: str | Path | None = None):
    """The recipe's pretrained tokenizer (``tokenizer.path``, else ``model.path``), or the one
    saved at ``path`` (a run's trained ``tokenizer/``)."""
    if path is not None:
        return AutoTokenizer.from_pretrained(path)
    key = "tokenizer.path" if recipe.tokenizer.path else "model.path"
    m = recipe.model
    revision = m.revision if recipe.tokenizer_path == m.path else None
    try:
        return AutoTokenizer.from_pretrained(recipe.tokenizer_path, revision=revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{key}: could not load a tokenizer from {recipe.tokenizer_path}: {first_line(e)}") from None


def model_config(recipe: Recipe, tokenizer):
    """The student's config: the checkpoint's, or ``model.config`` (a from-scratch model) with
    the tokenizer's vocabulary size and special ids."""
    m = recipe.model
    if m.path is not None:
        try:
            return AutoConfig.from_pretrained(m.path, revision=m.revision, trust_remote_code=m.trust_remote_code)
        except (OSError, ValueError) as e:
            raise RecipeError(f"model.path: could not load the config of {m.path}: {first_line(e)}") from None
    kw = dict(m.config)
    kw.setdefault("vocab_size", len(tokenizer))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        kw.setdefault(key, getattr(tokenizer, key))
    if kw["model_type"] not in CONFIG_MAPPING:
        raise RecipeError(f"model.config.model_type: unknown model type {kw['model_type']!r} (e.g. llama, mistral, qwen2, opt)")
    config_class = CONFIG_MAPPING[kw["model_type"]]
    defaults = config_class().to_dict()
    check_inline_config(m.config, defaults)
    try:
        config = AutoConfig.for_model(**kw)
    except Exception as e:  # ValueError, TypeError, or huggingface_hub's validation error wrapping one
        raise RecipeError(f"model.config: {first_line(e.__cause__ or e)}") from None
    check_unknown_keys(m.config, config_class, defaults, config)
    return config


def check_inline_config(given: dict, defaults: dict) -> None:
    """An inline ``model.config`` before transformers sees it: sizes and counts positive integers,
    heads dividing the hidden size (transformers accepts negative sizes silently)."""
    for key, value in given.items():
        if key.endswith(("_size", "_layers", "_heads")) or key.startswith("num_") or key == "max_position_embeddings":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise RecipeError(f"model.config.{key}: expected a positive integer (got {value!r})")
    merged = {**defaults, **given}
    heads, hidden, kv = merged.get("num_attention_heads"), merged.get("hidden_size"), merged.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(hidden, int) and hidden % heads:
        raise RecipeError(f"model.config.num_attention_heads: {heads} does not divide hidden_size {hidden}")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise RecipeError(f"model.config.num_key_value_heads: {kv} does not divide num_attention_heads {heads}")


def check_unknown_keys(given: dict, config_class, defaults: dict, config) -> None:
    """A key the model type does not know: transformers keeps it as a stray attribute (a legacy
    key it understands, e.g. ``rope_theta``, is folded into the config instead and passes)."""
    known = set(inspect.signature(config_class.__init__).parameters) | set(defaults) | {"model_type"}
    stray = [k for k in given if k not in known and k in config.to_dict()]
    if stray:
        close = difflib.get_close_matches(stray[0], sorted(known), n=1, cutoff=0.75)
        raise RecipeError(f"model.config.{stray[0]}: unknown key for {config_class.model_type}" + (f" (did you mean {close[0]}?)" if close else ""))


def vocab_size(config) -> int | None:
    """The width of a model's logits (multimodal configs keep it on their text config)."""
    v = getattr(config, "vocab_size", None)
    if v is None and hasattr(config, "get_text_config"):
        v = getattr(config.get_text_config(), "vocab_size", None)
    return v


def check_vocab(tokenizer, config, key: str) -> None:
    """The tokenizer's ids fit the model's embedding (else the first batch fails with an IndexError)."""
    v = vocab_size(config)
    if tokenizer is not None and v is not None and len(tokenizer) > v:
        raise RecipeError(f"{key}: the tokenizer has {len(tokenizer)} ids but the model's embedding has {v} rows; "
                          "use the model's own tokenizer (tokenizer.path: null)")


def check_sources(recipe: Recipe, config, tokenizer) -> None:
    """Everything about the recipe's models that can be checked without loading weights, before
    a run directory is touched: the weight files are whole, the tokenizer fits the student and
    the teacher's vocabulary is the student's (KD compares their logits token by token)."""
    m = recipe.model
    check_weight_files(m.path, "model.path")
    check_vocab(tokenizer, config, "tokenizer.path" if recipe.tokenizer.path else "model.path")
    if recipe.teacher is not None and recipe.teacher_path is not None and recipe.teacher_path != m.path:
        key = "teacher.path"
        check_weight_files(recipe.teacher_path, key)
        try:
            t_config = AutoConfig.from_pretrained(recipe.teacher_path, trust_remote_code=m.trust_remote_code)
        except (OSError, ValueError) as e:
            raise RecipeError(f"{key}: could not load the config of {recipe.teacher_path}: {first_line(e)}") from None
        if vocab_size(t_config) != vocab_size(config):
            raise RecipeError(f"{key}: the teacher's vocabulary has {vocab_size(t_config)} ids and the student's {vocab_size(config)}; "
                              "distillation needs the same vocabulary (a teacher of the same model family and tokenizer)")


def _student_kw(recipe: Recipe) -> dict:
    m = recipe.model
    return dict(trust_remote_code=m.trust_remote_code, attn_implementation=m.attn_implementation, dtype=DTYPES[m.dtype])


def empty_model(config, **kw) -> nn.Module:
    """A model's structure with its parameters on the meta device and its buffers real (rotary
    tables and the like, which no state dict carries): what an FSDP2 process other than the main
    one builds, to be filled by the main process's broadcast (Accelerate's
    ``cpu_ram_efficient_loading``)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, **kw)


def load_student(recipe: Recipe, config, weights: bool = True) -> nn.Module:
    """The student in ``model.dtype``: ``model.path``'s weights, or a from-scratch model;
    ``weights=False``: its structure only (``empty_model``)."""
    m = recipe.model
    if not weights:
        return empty_model(config, **_student_kw(recipe))
    if m.path is not None:
        return AutoModelForCausalLM.from_pretrained(m.path, revision=m.revision, **_student_kw(recipe))
    return AutoModelForCausalLM.from_config(config, **_student_kw(recipe))


def student_skeleton(recipe: Recipe, config) -> nn.Module:
    """The student's structure on the meta device: no memory, nothing read from disk. ``final/``
    is built on it from the trained state (``load_state_dict(..., assign=True)``)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **_student_kw(recipe))


def load_teacher(recipe: Recipe, device: torch.device | str | None = None, weights: bool = True) -> nn.Module:
    """The frozen teacher (``teacher.path``, default the original ``model.path``) in
    ``teacher.dtype``, eval mode, no gradients. The one place a teacher is loaded.
    ``weights=False``: its structure only (``empty_model``)."""
    m = recipe.model
    revision = m.revision if recipe.teacher_path == m.path else None  # the revision names the student's checkpoint
    kw = dict(dtype=DTYPES[recipe.teacher.dtype if recipe.teacher is not None else "float32"],
              trust_remote_code=m.trust_remote_code, attn_implementation=m.attn_implementation)
    if weights:
        teacher = AutoModelForCausalLM.from_pretrained(recipe.teacher_path, revision=revision, **kw)
    else:
        config = AutoConfig.from_pretrained(recipe.teacher_path, revision=revision, trust_remote_code=m.trust_remote_code)
        teacher = empty_model(config, **kw)
    if device is not None:
        teacher.to(device)
    return teacher.eval().requires_grad_(False)


def load_models(recipe: Recipe, config, with_teacher: bool = True, weights: bool = True):
    student = load_student(recipe, config, weights)
    teacher = load_teacher(recipe, weights=weights) if recipe.teacher is not None and with_teacher else None
    return student, teacher


def act_bits(path: Path) -> dict[str, int | None]:
    """``{layer: quant.act_bits}`` of a model directory's ``qat_quant.json``."""
    return {n: info.get("act_bits") for n, info in load_quant_layers(path).items()}


def empty_model_dir(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    """``load_model_dir``'s model (no adapter) as structure only (``empty_model``), in eval mode,
    no gradients: filled by a broadcast of the main process's copy."""
    path = Path(path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model = empty_model(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    add_activation_quant(model, act_bits(path))
    return model.eval().requires_grad_(False)


def load_model_dir(path: str | Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """``(model, tokenizer)`` of a model directory (``final/``, an export); applies ``adapter/``
    (PEFT) when present, and the activation fake-quant of ``quant.act_bits`` layers (``qat_quant.json``). ``trust_remote_code``: the run's ``model.trust_remote_code``."""
    path = Path(path)
    kw = {} if dtype == "auto" else {"dtype": DTYPES[dtype]}
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kw)
    add_activation_quant(model, act_bits(path))  # quant.act_bits: the activations quantized as in training
    adapter = path / ADAPTER_DIR
    if (adapter / "adapter_config.json").exists():
        peft = require("peft", f"{path}: its LoRA adapter (adapter/)")
        model = peft.PeftModel.from_pretrained(model, str(adapter))
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model.to(torch.device(device)).eval().requires_grad_(False)
    return model, tokenizer
