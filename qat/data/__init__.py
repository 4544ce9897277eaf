"""Data: sources -> documents -> token blocks (``corpus``), which blocks are used when
(``plans``), a recipe's tokenizer / config / quant plan / blocks (``setup``), and teacher-generated
training data (``generate``)."""

from .corpus import EOT, TokenBlocks, build_datasets, load_documents, python_stdlib_files, train_tokenizer

__all__ = ["EOT", "TokenBlocks", "build_datasets", "load_documents", "python_stdlib_files", "train_tokenizer"]
