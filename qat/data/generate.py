"""Data-free distillation data (LLM-QAT, arXiv 2305.17888): ``data.source: teacher-generated``.

Sequences are sampled from the teacher: the first token uniformly from the vocabulary (special
tokens excluded), then ``data.generate.length - 1`` tokens by top-k / temperature sampling (EOS
suppressed, so every sequence has the full length). Generation runs in batches of
``data.generate.batch_size``; each batch is one shard ``shard-NNNNN.safetensors`` (``input_ids``
int32 ``[batch, length]``) written atomically to the cache directory
``<data.cache_dir or output_dir/generated-data>/<fingerprint>/``, where the fingerprint hashes the
teacher and the generation keys. Shard ``i`` is sampled from its own seed (``seed``, ``i``), so an
interrupted generation resumes at the first missing shard and yields exactly the sequences of an
uninterrupted one; a complete cache (``meta.json`` with ``complete: true``) is reused by later
runs without loading the teacher. The training blocks are the sequences cut to ``data.seq_len``
(or padded, with a zero attention mask, when shorter).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..dist import my_share
from ..io.models import load_teacher
from .corpus import TokenBlocks, build_datasets

SHARD = "shard-{:05d}.safetensors"
META = "meta.json"


def gen_params(recipe) -> dict:
    g = recipe.data.generate
    return {
        "teacher": str(Path(recipe.teacher_path).expanduser().resolve()) if Path(recipe.teacher_path).expanduser().exists() else recipe.teacher_path,
        "count": g.count,
        "length": g.length or recipe.data.seq_len,
        "temperature": g.temperature,
        "top_k": g.top_k,
        "seed": g.seed,
        "batch_size": g.batch_size,
        "first_token": "uniform",
    }


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors shard atomically: a kill leaves the whole file or none (a ``.tmp``)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def cache_dir(recipe) -> Path:
    params = gen_params(recipe)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(recipe.data.cache_dir).expanduser() if recipe.data.cache_dir else Path(recipe.output_dir) / "generated-data"
    return root / key


def _special_ids(tokenizer) -> list[int]:
    return sorted({i for i in getattr(tokenizer, "all_special_ids", []) if i is not None})


@torch.no_grad()
def sample_batch(teacher, n: int, length: int, vocab: int, temperature: float, top_k: int | None, seed: int, shard: int, exclude: list[int], device) -> torch.Tensor:
    """``n`` sequences of ``length`` tokens, seeded by (seed, shard): first token uniform over the
    vocabulary minus ``exclude``, then top-k / temperature sampling with a KV cache."""
    g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + shard)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[i for i in exclude if i < vocab]] = False
    pool = allowed.nonzero().squeeze(1)
    ids = pool[torch.randint(len(pool), (n, 1), generator=g)].to(device)
    out = [ids]
    past = None
    for _ in range(length - 1):
        o = teacher(input_ids=ids, past_key_values=past, use_cache=True)
        past = o.past_key_values
        logits = o.logits[:, -1].float() / temperature
        logits[:, ~allowed.to(logits.device)] = -float("inf")  # no EOS / pad: full-length sequences
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        probs = torch.softmax(logits, dim=-1).cpu()
        ids = torch.multinomial(probs, 1, generator=g).to(device)
        out.append(ids)
    return torch.cat(out, dim=1).cpu()


def generate_cached(recipe, tokenizer, device=None, progress: bool = True, accelerator=None) -> Path:
    """Fill the cache directory (resuming at the first missing shard); returns it. Under several
    processes every rank samples its share of the missing shards (shard i is seeded by i, so who
    samples it does not change it), then all wait for the complete set."""
    from tqdm.auto import tqdm

    params = gen_params(recipe)
    d = cache_dir(recipe)
    meta_path = d / META
    main = accelerator is None or accelerator.is_main_process
    if meta_path.exists() and json.loads(meta_path.read_text()).get("complete"):
        return d
    if main:
        d.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps({**params, "complete": False}, indent=1))
    n_shards = -(-params["count"] // params["batch_size"])
    missing = [i for i in range(n_shards) if not (d / SHARD.format(i)).exists()] if main else None
    todo = my_share(missing, accelerator)
    if accelerator is not None:
        device = device or accelerator.device
    if todo:
        d.mkdir(parents=True, exist_ok=True)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        teacher = load_teacher(recipe, device)
        vocab = teacher.get_output_embeddings().weight.shape[0]
        exclude = _special_ids(tokenizer)
        done = params["batch_size"] * (n_shards - len(todo))
        bar = tqdm(total=params["count"], initial=min(done, params["count"]), desc="generating teacher data", disable=not progress or not main, dynamic_ncols=True)
        for i in todo:
            n = min(params["batch_size"], params["count"] - i * params["batch_size"])
            ids = sample_batch(teacher, n, params["length"], vocab, params["temperature"], params["top_k"], params["seed"], i, exclude, device)
            save_shard({"input_ids": ids.to(torch.int32).contiguous()}, d / SHARD.format(i))
            bar.update(n)
        bar.close()
        del teacher
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if main:
        meta_path.write_text(json.dumps({**params, "complete": True, "shards": n_shards}, indent=1))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return d


def load_generated(d: Path, seq_len: int) -> TokenBlocks:
    from safetensors.torch import load_file

    meta = json.loads((d / META).read_text())
    ids = torch.cat([load_file(str(d / SHARD.format(i)))["input_ids"] for i in range(meta["shards"])]).long()
    mask = torch.ones_like(ids)
    if ids.shape[1] >= seq_len:
        return TokenBlocks(ids[:, :seq_len], mask[:, :seq_len])
    pad = seq_len - ids.shape[1]
    return TokenBlocks(torch.nn.functional.pad(ids, (0, pad)), torch.nn.functional.pad(mask, (0, pad)))


def build_run_datasets(recipe, tokenizer):
    """``(train, valid)`` token blocks: ``build_datasets`` for the file / hub sources; for
    ``teacher-generated`` the cached teacher samples (generated first when missing) and the
    validation blocks from ``data.valid_files``."""
    data = recipe.data
    if data.source != "teacher-generated":
        return build_datasets(data, tokenizer, seed=recipe.train.seed)
    train = load_generated(generate_cached(recipe, tokenizer), data.seq_len)
    valid = None
    if data.valid_files:  # the same validation blocks as a file-sourced run (train side unused)
        files_data = data.model_copy(update={"source": "files", "files": data.valid_files, "max_train_tokens": data.seq_len * 2})
        _, valid = build_datasets(files_data, tokenizer, seed=recipe.train.seed)
    return train, valid
