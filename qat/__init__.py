"""qat: quantization-aware fine-tuning of Hugging Face causal LMs."""

__version__ = "0.1.0"
