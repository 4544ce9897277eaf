"""A/B of the STE's pass-through region: ``qat train`` with a strict mask.

``grid._in_range`` passes the gradient of every weight whose rounding is a valid code, ``v`` in
``[qmin - 0.5, qmax + 0.5)``. The strict alternative is ``[qmin, qmax]``: a weight in
``(qmax, qmax + 0.5)`` rounds to ``qmax`` but gets no gradient. This script runs ``qat train``
with that strict mask (every fake-quant path calls ``grid._in_range``), so the two can be
compared on the same recipe and seed:

    python benchmarks/ste_ab.py RECIPE [dotted.key=value ...]     # same arguments as `qat train`
"""

from __future__ import annotations

import sys

from qat.cli import main
from qat.quant import grid


def strict_in_range(v, qmin: int, qmax: int):
    return (v >= qmin) & (v <= qmax)


if __name__ == "__main__":
    grid._in_range = strict_in_range
    sys.exit(main(["train", *sys.argv[1:]]))
