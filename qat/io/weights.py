"""The weight files of a model directory, read without loading them: are they whole, and what
identifies them.

A safetensors file is an 8-byte header length, a JSON header naming every tensor's byte range,
and the data. A file cut short (a copy or download that stopped) is found from the header alone,
before ``from_pretrained`` spends minutes loading the rest or a run directory is touched.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from ..recipe import RecipeError

SAMPLE = 1 << 20  # the bytes of data after each header that go into a fingerprint


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a local model directory (by its index when there is one)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is unreadable ({e.__class__.__name__})") from None
        return [model_dir / n for n in names]
    return sorted(model_dir.glob("*.safetensors"))


def _header(f: Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file; ValueError naming what is wrong."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{f} is truncated ({size} bytes: not even a header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{f} is truncated ({size} bytes; its header alone needs {n + 8})")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise ValueError(f"{f} has an unreadable header: not a safetensors file, or damaged") from None
    if not isinstance(header, dict):
        raise ValueError(f"{f} has an unreadable header")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{f} is truncated ({size} bytes; its tensors need {8 + n + end})")
    return n, header


def check_weight_files(path: str | Path | None, key: str) -> None:
    """Every weight file of the local model directory ``path`` is whole (``RecipeError`` naming
    ``key`` and the file otherwise); a hub id is left to ``from_pretrained``."""
    if path is None or not Path(path).is_dir():
        return
    try:
        files = weight_files(Path(path))
        for f in files:
            if not f.is_file():
                raise ValueError(f"{f} is missing (listed in the index)")
            _header(f)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{key}: {e}; the checkpoint is damaged, copy it again") from None


def fingerprint(path: str | Path | None, revision: str | None = None) -> str | None:
    """What identifies the weights at ``path`` without reading them all: the config, and per
    weight file its size, header and first MiB of data. A hub id: the id and revision."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_dir():
        return f"{path}@{revision or 'main'}"
    h = hashlib.sha256()
    for name in ("config.json",):
        if (p / name).is_file():
            h.update((p / name).read_bytes())
    for f in weight_files(p):
        n, _ = _header(f)
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(8 + n + SAMPLE))
    return h.hexdigest()
