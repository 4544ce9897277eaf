"""Layerwise PTQ baselines on the grid of ``qat/quant/grid.py``: RTN, GPTQ, AWQ, QERA.

``calibrate.py`` is the shared block-by-block runner; one file per method; ``run.py`` turns a
recipe into a run directory (``qat ptq``).
"""

from .run import METHODS, default_run_dir, quantize_ptq, run_ptq

__all__ = ["METHODS", "default_run_dir", "quantize_ptq", "run_ptq"]
