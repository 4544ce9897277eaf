"""Optional dependencies: which package each import comes from, and the extra that installs it.

Heavy or optional parts (export, wandb, LoRA, bitsandbytes, lm-eval, plots) are imported only
where they are used. When one is missing, ``require`` raises ``MissingDependency`` with one line
that names what needed it and the ``pip install`` that fixes it; the CLI prints that line and
exits with code 2 (no traceback).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

DIST = "qat-llm"  # the distribution's name on the package index (the import name is qat)

# top-level module -> (PyPI package, qat extra)
OPTIONAL = {
    "compressed_tensors": ("compressed-tensors", "export"),
    "wandb": ("wandb", "wandb"),
    "peft": ("peft", "peft"),
    "bitsandbytes": ("bitsandbytes", "bnb"),
    "lm_eval": ("lm-eval", "eval"),
    "matplotlib": ("matplotlib", "plot"),
}


class MissingDependency(ImportError):
    """An optional package is not installed; the message is one line with the fix."""


def requirement(package: str) -> str:
    """``package`` with the version bound qat's own metadata gives it (``compressed-tensors>=0.12``),
    or the bare name when qat runs from a source tree that was not installed."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires(DIST) or []
    except PackageNotFoundError:
        return package
    for r in reqs:
        spec = r.split(";")[0].strip()
        name = spec.split("[")[0]
        for op in ("<", ">", "=", "!", "~", " "):
            name = name.split(op)[0]
        if name.lower().replace("_", "-") == package.lower():
            return spec.replace(" ", "")
    return package


def hint(module: str, needed_for: str) -> str:
    """One line: what needs the package, and the install command that works in a checkout and
    outside one (the package itself, with qat's bound; ``DIST[extra]`` installs the same set)."""
    package, extra = OPTIONAL[module.split(".")[0]]
    return f"{needed_for} needs {package}, which is not installed: pip install '{requirement(package)}' (or the {DIST}[{extra}] extra)"


def available(module: str) -> bool:
    """Whether ``module`` (top level) can be imported, without importing it."""
    return importlib.util.find_spec(module.split(".")[0]) is not None


def require(module: str, needed_for: str) -> ModuleType:
    """Import ``module`` or raise ``MissingDependency`` naming ``needed_for`` and the extra."""
    top = module.split(".")[0]
    if top not in OPTIONAL:
        raise KeyError(f"{top} is not a known optional dependency (add it to qat.deps.OPTIONAL)")
    if not available(top):
        raise MissingDependency(hint(module, needed_for))
    return importlib.import_module(module)
