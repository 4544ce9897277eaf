"""``qat env``: the versions and devices a bug report needs, one ``name: value`` line each."""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version

from ..deps import DIST

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "safetensors", "tokenizers", "compressed-tensors", "peft",
            "bitsandbytes", "wandb", "lm-eval")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def report() -> list[tuple[str, str]]:
    import torch

    import qat

    rows = [(DIST, f"{_version(DIST)} ({qat.__file__.rsplit('/', 2)[0]})"), ("python", sys.version.split()[0]),
            ("platform", platform.platform())]
    rows += [(p, _version(p)) for p in PACKAGES]
    rows.append(("CUDA (torch built with)", torch.version.cuda or "none"))
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rows.append(("GPUs", str(n)))
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        rows.append((f"  cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}"))
    rows.append(("CPU threads", str(torch.get_num_threads())))
    return rows


def run(args) -> int:
    for name, value in report():
        print(f"{name}: {value}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("env", help="versions of qat, torch, transformers, accelerate, ... and the GPUs (for bug reports)")
    p.set_defaults(func=run)
