"""The teacher's top-k logits, computed once: ``distill.teacher_cache``.

Before training, the teacher runs over the training blocks the run will use and keeps, per
token, its ``top_k`` largest logits and their ids. Block ``b`` of the training set lives in shard
``b // shard_blocks`` (``shard-NNNNN.safetensors``: ``ids`` int32 and ``logits`` in the teacher's
output dtype, both ``[blocks, seq_len, top_k]``), written atomically (``qat.generate.save_shard``)
into ``distill.teacher_cache.dir`` (default ``<output_dir>/teacher-cache``). A shard is computed
whole or not at all, so a killed precompute resumes at the missing shards and yields exactly the
shards of an uninterrupted one. ``meta.json`` holds the fingerprint (teacher, its weight files,
dtype and the run's autocast, a hash of the training blocks, seq_len, top_k, shard_blocks); a
directory whose fingerprint differs is refused with the keys that differ, one that matches is
reused, and shards another run needs are added to it. Under several processes each computes
every ``world``-th missing shard, then all wait for each other.

Training from the cache never loads the teacher: the loop reads each micro-batch's rows by block
index (``TeacherCache.lookup``) and the KD loss is the top-k loss of ``qat.distill``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..data.generate import SHARD, save_shard
from ..dist import my_share
from ..io.models import load_teacher
from ..recipe import Recipe, RecipeError
from .losses import TopK

META = "meta.json"


def cache_dir(recipe: Recipe) -> Path:
    c = recipe.distill.teacher_cache
    return Path(c.dir).expanduser() if c.dir else Path(recipe.output_dir) / "teacher-cache"


def _teacher_identity(path: str) -> dict:
    """The teacher's resolved path, and for a local directory a hash of its config and the
    names and sizes of its weight files (weights are not hashed: that would read them all)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return {"teacher": path}
    files = sorted((f.name, f.stat().st_size) for f in p.iterdir() if f.suffix in (".safetensors", ".bin"))
    config = p / "config.json"
    return {
        "teacher": str(p.resolve()),
        "teacher_config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "teacher_weight_files": [list(f) for f in files],
    }


def _attention(recipe: Recipe) -> str | None:
    """The attention the teacher runs with: ``model.attn_implementation``, or (null) transformers'
    choice for the family, sdpa where it has it, else eager."""
    if recipe.model.attn_implementation is not None:
        return recipe.model.attn_implementation
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(recipe.teacher_path, trust_remote_code=recipe.model.trust_remote_code)
        return "sdpa" if getattr(AutoModelForCausalLM._model_mapping[type(config)], "_supports_sdpa", False) else "eager"
    except Exception:  # a remote-code or unknown family: named as chosen by transformers
        return "default"


def fingerprint(recipe: Recipe, blocks) -> dict:
    """What the cached logits depend on; two runs with equal fingerprints share a cache."""
    c = recipe.distill.teacher_cache
    h = hashlib.sha256(repr(tuple(blocks.input_ids.shape)).encode())
    h.update(blocks.input_ids.to(torch.int64).contiguous().numpy().tobytes())
    h.update(blocks.attention_mask.to(torch.int64).contiguous().numpy().tobytes())
    return {
        **_teacher_identity(recipe.teacher_path),
        "teacher_dtype": recipe.teacher.dtype,
        "mixed_precision": recipe.train.mixed_precision,
        "attn_implementation": _attention(recipe),
        "data_sha256": h.hexdigest(),
        "blocks": len(blocks),
        "seq_len": int(blocks.input_ids.shape[1]),
        "top_k": c.top_k,
        "shard_blocks": c.shard_blocks,
    }


def check(recipe: Recipe, blocks) -> dict:
    """The run's fingerprint; a ``RecipeError`` naming the differing keys when the cache
    directory holds a cache made with other settings. Reads only."""
    fp = fingerprint(recipe, blocks)
    d = cache_dir(recipe)
    meta = d / META
    if meta.is_file():
        have = json.loads(meta.read_text())["fingerprint"]
        diff = sorted(k for k in fp.keys() | have.keys() if fp.get(k) != have.get(k))
        if diff:
            shown = "; ".join(f"{k}: {_short(have.get(k))} there, {_short(fp.get(k))} here" for k in diff)
            raise RecipeError(
                f"distill.teacher_cache.dir: {d} holds a teacher cache made with other settings ({shown}); "
                "set another distill.teacher_cache.dir or delete that directory"
            )
    elif d.exists() and any(d.iterdir()):
        raise RecipeError(f"distill.teacher_cache.dir: {d} exists, is not empty and holds no teacher cache ({META} missing)")
    return fp


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


def needed_shards(block_indices: torch.Tensor, shard_blocks: int) -> list[int]:
    return sorted(set((block_indices // shard_blocks).tolist()))


def precompute(recipe: Recipe, blocks, block_indices: torch.Tensor, accelerator=None, progress: bool = True) -> Path:
    """Write every shard that holds one of ``block_indices`` and is missing; returns the cache
    directory. Loads the teacher only when this process has shards to compute."""
    from tqdm.auto import tqdm

    fp = check(recipe, blocks)
    c = recipe.distill.teacher_cache
    d = cache_dir(recipe)
    rank = accelerator.process_index if accelerator else 0
    if rank == 0 and not (d / META).is_file():
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (META + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": fp, "format": 1}, indent=1))
        tmp.replace(d / META)
    if accelerator:
        accelerator.wait_for_everyone()
    missing = [i for i in needed_shards(block_indices, c.shard_blocks) if not (d / SHARD.format(i)).exists()] if rank == 0 else None
    mine = my_share(missing, accelerator)
    if mine:
        device = accelerator.device if accelerator else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        teacher = load_teacher(recipe, device)
        bar = tqdm(total=len(mine), desc=f"teacher top-{c.top_k} cache", disable=not progress or rank != 0, dynamic_ncols=True)
        for i in mine:
            lo, hi = i * c.shard_blocks, min((i + 1) * c.shard_blocks, len(blocks))
            save_shard(teacher_topk(teacher, blocks, lo, hi, c.top_k, c.batch_size, device, accelerator), d / SHARD.format(i))
            bar.update(1)
        bar.close()
        del teacher
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if accelerator:
        accelerator.wait_for_everyone()
    return d


@torch.no_grad()
def teacher_topk(teacher, blocks, lo: int, hi: int, k: int, batch_size: int, device, accelerator=None) -> dict[str, torch.Tensor]:
    """``{"ids": int32, "logits"}`` ``[hi - lo, seq_len, k]``: the teacher's k largest logits per
    position of blocks ``lo..hi-1`` (under the run's autocast, as the online teacher runs)."""
    ids, vals = [], []
    for s in range(lo, hi, batch_size):
        sl = slice(s, min(s + batch_size, hi))
        with accelerator.autocast() if accelerator else torch.autocast(device.type, enabled=False):
            logits = teacher(input_ids=blocks.input_ids[sl].to(device), attention_mask=blocks.attention_mask[sl].to(device), use_cache=False).logits
        top = logits.topk(min(k, logits.shape[-1]), dim=-1)
        ids.append(top.indices.to(torch.int32).cpu())
        vals.append(top.values.cpu())
    return {"ids": torch.cat(ids).contiguous(), "logits": torch.cat(vals).contiguous()}


class TeacherCache:
    """Reads a micro-batch's top-k rows by block index (memory-mapped shards, opened once)."""

    def __init__(self, d: Path):
        self.dir = Path(d)
        self.shard_blocks = json.loads((self.dir / META).read_text())["fingerprint"]["shard_blocks"]
        self._open: dict[int, object] = {}

    def _shard(self, i: int):
        from safetensors import safe_open

        if i not in self._open:
            path = self.dir / SHARD.format(i)
            if not path.is_file():
                raise FileNotFoundError(f"teacher cache {self.dir}: {path.name} is missing (was the precompute interrupted?)")
            self._open[i] = safe_open(str(path), framework="pt", device="cpu")
        return self._open[i]

    def lookup(self, block_indices: torch.Tensor, device=None) -> TopK:
        ids, vals = [], []
        for b in block_indices.tolist():
            f, row = self._shard(b // self.shard_blocks), b % self.shard_blocks
            ids.append(f.get_slice("ids")[row : row + 1])
            vals.append(f.get_slice("logits")[row : row + 1])
        return TopK(torch.cat(ids).to(device), torch.cat(vals).to(device))
