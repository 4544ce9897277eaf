"""A recipe's data side, checked before any weights load: its tokenizer (pretrained, or trained on
the training documents), the model config, the quantization plan and the token blocks."""

from __future__ import annotations

from pathlib import Path

from ..io.models import check_sources, load_tokenizer, model_config
from ..policy import quant_plan
from ..recipe import Recipe, RecipeError
from .corpus import build_datasets, load_documents, train_tokenizer


def tokenizer_for(recipe: Recipe, out: Path, reuse_trained: bool):
    """The recipe's tokenizer, or one trained on the training data (in memory: the run directory
    gets it when it is created); ``reuse_trained``: take the run's own ``tokenizer/`` if there."""
    if recipe.tokenizer_path is not None:
        return load_tokenizer(recipe)
    tok_dir = out / "tokenizer"  # trained once per run, reused on resume
    if reuse_trained and (tok_dir / "tokenizer.json").exists():
        return load_tokenizer(recipe, tok_dir)
    try:
        return train_tokenizer(load_documents(recipe.data, "train"), recipe.tokenizer.train_vocab_size)
    except ValueError as e:
        raise RecipeError(str(e)) from None


def check_positions(recipe: Recipe, config) -> None:
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and recipe.data.seq_len > max_pos:
        raise RecipeError(f"data.seq_len: {recipe.data.seq_len} exceeds the model's max_position_embeddings {max_pos}")


def load_plan_and_data(recipe: Recipe, out: Path):
    """Tokenizer, model config, quantization plan and (train, valid) blocks of a recipe, checked
    before any weights load: what PTQ and ``qat analyze`` start from."""
    tokenizer = tokenizer_for(recipe, out, reuse_trained=False)
    config = model_config(recipe, tokenizer)
    check_sources(recipe, config, tokenizer)
    check_positions(recipe, config)
    plan = quant_plan(recipe, config)
    try:
        train_set, valid_set = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    return tokenizer, config, plan, train_set, valid_set
