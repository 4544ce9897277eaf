"""On-disk sizes of an export against bf16."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..io.final import LEGACY

SIDECARS = tuple(LEGACY.values())  # qat's own files beside the model weights in runs written before its qat/ folder


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _headers(path: Path) -> dict[str, dict]:
    """name -> safetensors header entry (dtype, shape, data_offsets) over the model's files."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name in SIDECARS:
            continue
        with open(f, "rb") as h:
            n = int.from_bytes(h.read(8), "little")
            header = json.loads(h.read(n))
        out.update({k: v for k, v in header.items() if k != "__metadata__"})
    return out


def weights_bytes(path: Path) -> int:
    """Bytes of the model's safetensors files (headers included; adapter/ and qat's own files
    excluded)."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors") if f.name not in SIDECARS)


def bf16_bytes(final_dir: Path) -> int:
    """2 bytes x every parameter stored in final/'s model safetensors files (tensor data only)."""
    return 2 * sum(math.prod(v["shape"]) for v in _headers(final_dir).values())


def layer_bytes(path: Path, layers) -> int:
    """Tensor bytes stored under the given layer names (packed weights, scales, zero-points, ...)."""
    prefixes = tuple(f"{n}." for n in layers)
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in _headers(path).items() if k.startswith(prefixes))


def bf16_layer_bytes(final_dir: Path, layers) -> int:
    names = {f"{n}.weight" for n in layers} | {f"{n}.bias" for n in layers}
    return 2 * sum(math.prod(v["shape"]) for k, v in _headers(final_dir).items() if k in names)


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)
