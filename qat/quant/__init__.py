"""Quantization core: the grid (pure functions), the scheme, the fake-quant Linear, wrapping, freezing."""

from .apply import DEFAULT_TARGETS, QuantReport, dequantize_model, qat_linears, quantize_model
from .freeze import OV_PATTERNS, POLICIES, apply_freeze
from .grid import dequantize, fake_quantize, fake_quantize_ste, minmax_qparams, mse_clip_ratio, qrange, quantize
from .linear import QATLinear, QuantizedWeight
from .scheme import SUPPORTED_BITS, QuantConfigError, QuantScheme

__all__ = [
    "DEFAULT_TARGETS",
    "OV_PATTERNS",
    "POLICIES",
    "SUPPORTED_BITS",
    "QATLinear",
    "QuantConfigError",
    "QuantReport",
    "QuantScheme",
    "QuantizedWeight",
    "apply_freeze",
    "dequantize",
    "dequantize_model",
    "fake_quantize",
    "fake_quantize_ste",
    "minmax_qparams",
    "mse_clip_ratio",
    "qat_linears",
    "qrange",
    "quantize",
    "quantize_model",
]
