"""What defines a training run, stored in every checkpoint and compared before a resume.

A checkpoint continues a run only when it was written by that run: the same run directory (its
marker's ``run_id``), the same training-relevant recipe keys, the same model and teacher weights
and the same training tokens. A resume that differs is refused with the keys that differ. A few
keys may change when a run is continued (``RESUMABLE_CHANGES``: more steps, another learning
rate); such a change is printed and recorded in later checkpoints and in ``eval.json``. How a run
is logged, evaluated and checkpointed, and where it lives, may change freely (``UNTRAINED_KEYS``).
"""

from __future__ import annotations

import hashlib
import json

from ..io.weights import fingerprint
from ..recipe import Recipe

RESUMABLE_CHANGES = ("train.max_steps", "train.epochs", "train.lr", "train.max_bad_steps")  # printed and recorded
UNTRAINED_KEYS = ("output_dir", "train.log_every", "train.collective_timeout_s", "checkpoint.", "eval.", "tracking.")  # how a run is watched and kept: free


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def data_digest(train_set) -> str:
    """sha256 of the training blocks (token ids and mask): the data the run's steps index into."""
    h = hashlib.sha256()
    h.update(train_set.input_ids.contiguous().numpy().tobytes())
    h.update(train_set.attention_mask.contiguous().numpy().tobytes())
    return h.hexdigest()


def run_identity(recipe: Recipe, train_set) -> dict:
    """The identity a checkpoint of this run carries (JSON-ready)."""
    m = recipe.model
    return {
        "recipe": json.loads(json.dumps(_flat(recipe.to_dict()), default=str)),
        "model": fingerprint(m.path, m.revision),
        "teacher": fingerprint(recipe.teacher_path, m.revision if recipe.teacher_path == m.path else None) if recipe.teacher is not None else None,
        "data": data_digest(train_set),
    }


def _matches(key: str, keys: tuple[str, ...]) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in keys)


def compare(old: dict, new: dict) -> tuple[list[str], list[dict]]:
    """(what differs and may not, the allowed changes as ``{"key", "from", "to"}``) between the
    identity stored in a checkpoint and this run's. Recipe keys only one side knows (a key added to
    the schema since) are not compared."""
    refused, allowed = [], []
    o, n = old.get("recipe") or {}, new.get("recipe") or {}
    for key in sorted(set(o) & set(n)):
        if o[key] != n[key] and not _matches(key, UNTRAINED_KEYS):
            if _matches(key, RESUMABLE_CHANGES):
                allowed.append({"key": key, "from": o[key], "to": n[key]})
            else:
                refused.append(f"{key} {o[key]!r} -> {n[key]!r}")
    for part, what in (("model", "the model weights (model.path)"), ("teacher", "the teacher weights"), ("data", "the training tokens")):
        if part in old and old[part] != new.get(part):
            refused.append(f"{what} differ")
    return refused, allowed
