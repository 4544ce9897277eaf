"""The quantization scheme of one weight tensor: a validated, immutable value object.

A scheme is per layer (``quantize_model`` may give different layers different schemes), so
mixed precision needs nothing special.

Conventions (those of compressed-tensors / GPTQ, i.e. of what vLLM serves):

- ``symmetric``: signed codes in ``[-2^(b-1), 2^(b-1) - 1]``, zero-point 0.
- asymmetric: unsigned codes in ``[0, 2^b - 1]`` with an integer zero-point in that range.
- ``grid="seq"``: ParetoQ's stretched elastic grid (Liu et al. 2025, arXiv 2502.02631): unsigned
  codes around a fixed half-integer zero-point ``(2^b - 1) / 2``, so the levels ``(q - z) * s`` are
  symmetric about 0 with no zero level (at 2 bits ``{-1.5, -0.5, 0.5, 1.5} * s``). Integer
  zero-point formats (compressed-tensors, GPTQ) cannot hold it; ``--format fake`` can.
- ``group_size=None`` is per-channel (one scale per output row); otherwise one scale per
  (output row, group of ``group_size`` consecutive input columns).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_INITS = ("minmax", "mse")
GRIDS = ("int", "seq")


class QuantConfigError(ValueError):
    """A scheme, pattern or policy that cannot be applied (names the layer or key at fault)."""


@dataclass(frozen=True)
class QuantScheme:
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    scale_init: Literal["minmax", "mse"] = "minmax"
    learnable: bool = False
    act_bits: int | None = None
    lsq_grad_scale: bool = False  # learnable scales: LSQ's gradient scale 1 / sqrt(N * Qp)
    grid: Literal["int", "seq"] = "int"  # "seq": zero-point fixed at (2^b - 1) / 2 (see the module docstring)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise QuantConfigError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0
        ):
            raise QuantConfigError(
                f"group_size must be a positive integer or None (per-channel), got {self.group_size!r}"
            )
        if self.scale_init not in SCALE_INITS:
            raise QuantConfigError(f"scale_init must be one of {SCALE_INITS}, got {self.scale_init!r}")
        if self.grid not in GRIDS:
            raise QuantConfigError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if self.grid == "seq" and self.symmetric:
            raise QuantConfigError("grid 'seq' has unsigned codes around the fixed zero-point (2^b - 1) / 2: it needs symmetric=False")
        if self.act_bits not in (None, 8):
            raise QuantConfigError(f"act_bits must be None or 8 (per-token int8), got {self.act_bits!r}")

    @property
    def granularity(self) -> str:
        return "channel" if self.group_size is None else "group"

    @property
    def seq(self) -> bool:
        return self.grid == "seq"

    @property
    def trains_zero_point(self) -> bool:
        """Learnable mode trains the zero-point of an asymmetric integer grid (SEQ's is fixed)."""
        return self.learnable and not self.symmetric and not self.seq

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def check_layer(self, name: str, in_features: int) -> None:
        """Raise a clear error if this scheme cannot quantize a layer of that width."""
        if self.group_size is not None and in_features % self.group_size != 0:
            raise QuantConfigError(
                f"layer {name!r}: group_size {self.group_size} does not divide in_features {in_features}"
            )

    def to_dict(self) -> dict:
        return asdict(self)
