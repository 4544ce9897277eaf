"""Data: documents from a ``DataSection`` -> token blocks for causal-LM training.

Loading always goes through ``datasets.load_dataset`` (files and hub/local datasets) or, for the
``python-stdlib`` quickstart corpus, through the ``*.py`` files of the running interpreter. The result
of each step is a ``datasets.Dataset`` with one ``text`` column holding one *document* per row.

Tokenization runs ``Dataset.map(batched=True)`` with the (fast) tokenizer and never adds special
tokens. With ``packing`` the documents are joined into one stream with ``eos`` before every
document and cut into ``seq_len`` blocks (remainder dropped); without it each document is one row,
truncated and right-padded. Everything is deterministic: same inputs -> identical tensors.

Errors are ``ValueError`` whose message starts with the recipe key at fault (``data.files: ...``).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import random
import sysconfig
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import transformers

    from ..recipe import DataSection

EOT = "<|endoftext|>"

_TEXT_EXTS = (".txt", ".text", ".md", ".tokens")
_JSON_EXTS = (".json", ".jsonl", ".ndjson")
_PARQUET_EXTS = (".parquet",)
_COMPRESSION_EXTS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})


# -- the dataset torch sees ------------------------------------------------------------------
class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length rows of token ids with an attention mask (1 real, 0 pad).

    ``self[i]`` is ``{"input_ids", "attention_mask", "labels"}`` with ``labels`` = ``input_ids``
    and -100 on padding; the default collate function stacks them into a batch.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.dim() != 2:
            raise ValueError(f"TokenBlocks: input_ids must be [N, seq_len], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = torch.as_tensor(attention_mask, dtype=torch.long)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"TokenBlocks: attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        self.input_ids = input_ids
        self.attention_mask = attention_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        mask = self.attention_mask[i]
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def n_tokens(self) -> int:
        """Number of real (non-pad) tokens."""
        return int(self.attention_mask.sum())

    def __repr__(self) -> str:
        return f"TokenBlocks(rows={len(self)}, seq_len={self.seq_len}, n_tokens={self.n_tokens})"


# -- helpers -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_progress(quiet: bool = True):
    """Silence datasets' progress bars for small internal maps (restores the previous state)."""
    import datasets

    was_disabled = not datasets.is_progress_bar_enabled()
    if quiet and not was_disabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if quiet and not was_disabled:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _no_download_count():
    """Local data: skip the download-count HEAD request load_dataset sends to the Hub for packaged
    builders (text/json/parquet). Offline, its DNS lookup alone can stall each load for seconds."""
    from datasets import config

    saved = config.HF_UPDATE_DOWNLOAD_COUNTS
    config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        config.HF_UPDATE_DOWNLOAD_COUNTS = saved


def _fingerprint(*parts) -> str:
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).hexdigest()[:32]


def _map(ds: datasets.Dataset, fn, tag: str, **kwargs) -> datasets.Dataset:
    """``Dataset.map(batched=True)`` in memory: no cache files are read or written, no function hashing."""
    return ds.map(
        fn,
        batched=True,
        remove_columns=ds.column_names,
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=_fingerprint(ds._fingerprint, tag),
        **kwargs,
    )


def _strip_compression(path: str) -> str:
    low = path.lower()
    for ext in _COMPRESSION_EXTS:
        if low.endswith(ext):
            return low[: -len(ext)]
    return low


def _format_of(path: str) -> str | None:
    base = _strip_compression(path)
    if base.endswith(_TEXT_EXTS):
        return "text"
    if base.endswith(_JSON_EXTS):
        return "json"
    if base.endswith(_PARQUET_EXTS):
        return "parquet"
    return None


def _expand_files(patterns: list[str], key: str) -> list[str]:
    """Globs -> existing files, sorted within each pattern, patterns in the given order, no duplicates."""
    out: list[str] = []
    seen = set()
    for pat in patterns:
        expanded = os.path.expanduser(pat)
        matches = sorted(glob.glob(expanded, recursive=True))
        if not matches and os.path.exists(expanded):  # a literal name with glob characters in it
            matches = [expanded]
        if not matches:
            raise ValueError(f"{key}: no file matches {pat!r}")
        files = [m for m in matches if os.path.isfile(m)]
        if not files:
            raise ValueError(f"{key}: {pat!r} matches only directories; use a glob such as 'dir/*.txt'")
        for f in files:
            f = os.path.abspath(f)
            if f not in seen:
                seen.add(f)
                out.append(f)
    return out


def _detect_format(files: list[str], fmt: str, key: str) -> str:
    if fmt != "auto":
        return fmt
    found = {}
    for f in files:
        kind = _format_of(f)
        if kind is None:
            raise ValueError(
                f"{key}: cannot tell the format of {f!r} from its extension "
                "(.txt/.text/.md, .json/.jsonl, .parquet, optionally .gz); set data.format"
            )
        found.setdefault(kind, f)
    if len(found) > 1:
        shown = ", ".join(f"{k} ({v})" for k, v in found.items())
        raise ValueError(f"{key}: files of different formats in one set: {shown}; use one format per set")
    return next(iter(found))


def _select_text(ds: datasets.Dataset, data: DataSection, where: str) -> datasets.Dataset:
    field = data.text_field
    if field not in ds.column_names:
        raise ValueError(f"data.text_field: column {field!r} not found in {where} (columns: {ds.column_names})")
    feat = ds.features[field]
    dtype = getattr(feat, "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ValueError(f"data.text_field: column {field!r} in {where} holds {feat}, expected strings")
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    return ds


def _load_files(data: DataSection, patterns: list[str], key: str) -> datasets.Dataset:
    import datasets

    files = _expand_files(patterns, key)
    fmt = _detect_format(files, data.format, key)
    where = f"{key} ({len(files)} {fmt} file{'s' if len(files) != 1 else ''})"
    verbosity = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(50)  # CRITICAL: a reader's failure is reported once, below, not logged too
    try:
        with _no_download_count():
            if fmt == "text":
                # one sample per file, so that documents are never cut at line breaks
                ds = datasets.load_dataset("text", data_files=files, split="train", sample_by="document")
            else:
                ds = datasets.load_dataset(fmt, data_files=files, split="train")
    except Exception as e:  # datasets wraps the reader's error (UnicodeDecodeError, BadGzipFile, JSON "Trailing data", ...)
        named = files[0] if len(files) == 1 else f"one of {len(files)} files"
        raise ValueError(f"{key}: {named} cannot be read as {fmt}: {_root_cause(e)}") from None
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
    return _select_text(ds, data, where)


def _root_cause(e: BaseException) -> str:
    """The innermost error of a chain, in one line (``datasets`` wraps a reader's error twice)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = " ".join(str(e).split())
    return f"{e.__class__.__name__}: {text[:200]}" if text else e.__class__.__name__


def _load_hf(data: DataSection, split: str, key: str) -> datasets.Dataset:
    import datasets

    name = data.name
    local = os.path.expanduser(name)
    is_local = os.path.exists(local)
    if is_local:
        name = local
    try:
        with _no_download_count() if is_local else contextlib.nullcontext():
            ds = datasets.load_dataset(name, data.config, split=split)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise ValueError(f"{key}: could not load split {split!r} of {data.name!r}: {e}") from e
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"{key}: load_dataset({data.name!r}, split={split!r}) gave {type(ds).__name__}, expected a Dataset")
    return _select_text(ds, data, f"{data.name!r} split {split!r}")


def python_stdlib_files() -> list[str]:
    """Every ``*.py`` under the interpreter's stdlib, sorted; no site-packages or test suites."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out, key=lambda p: os.path.relpath(p, root))


def _load_stdlib() -> datasets.Dataset:
    import datasets

    texts = []
    for path in python_stdlib_files():
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except (OSError, UnicodeDecodeError):
            continue
    ds = datasets.Dataset.from_dict({"text": texts})
    # a fingerprint from the content, so the in-memory dataset is reproducible
    ds._fingerprint = _fingerprint("python-stdlib", len(texts), hashlib.sha256("\x00".join(texts).encode()).hexdigest())
    return ds


def _to_documents(ds: datasets.Dataset, sep: str | None, key: str, what: str) -> datasets.Dataset:
    """Split samples on ``sep`` (if set) and drop empty / whitespace-only / null documents."""

    def split_docs(batch):
        out = []
        for text in batch["text"]:
            if text is None:
                continue
            for doc in text.split(sep) if sep else (text,):
                if doc.strip():
                    out.append(doc)
        return {"text": out}

    with _quiet_progress():
        docs = _map(ds, split_docs, f"qat-docs:{sep!r}")
    if len(docs) == 0:
        raise ValueError(f"{key}: {what} produced no documents")
    return docs


def _raw_split(data: DataSection, split: str) -> datasets.Dataset | None:
    """Documents of ``split`` ("train" / "valid") before any valid_fraction hold-out; None if no such split."""
    sep = data.doc_separator
    if split == "train":
        if data.source == "files":
            ds = _load_files(data, data.files or [], "data.files")
            return _to_documents(ds, sep, "data.files", f"{data.files}")
        if data.source == "hf":
            ds = _load_hf(data, data.split, "data.split")
            return _to_documents(ds, sep, "data.name", f"{data.name!r} split {data.split!r}")
        if data.source == "python-stdlib":
            return _to_documents(_load_stdlib(), sep, "data.source", "python-stdlib")
        raise ValueError(f"data.source: unknown source {data.source!r}")
    if split == "valid":
        if data.valid_files:
            ds = _load_files(data, data.valid_files, "data.valid_files")
            return _to_documents(ds, sep, "data.valid_files", f"{data.valid_files}")
        if data.valid_split:
            if data.source != "hf":
                raise ValueError(
                    f"data.valid_split: only for data.source 'hf' (source is {data.source!r}); use data.valid_files "
                    "or data.valid_fraction"
                )
            ds = _load_hf(data, data.valid_split, "data.valid_split")
            return _to_documents(ds, sep, "data.valid_split", f"{data.name!r} split {data.valid_split!r}")
        return None
    raise ValueError(f"load_documents: split must be 'train' or 'valid', got {split!r}")


def _hold_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded shuffle of range(n); the last ``fraction`` (>= 1 document) is validation. Both sorted."""
    n_valid = max(1, round(n * fraction))
    if n_valid >= n:
        raise ValueError(
            f"data.valid_fraction: {fraction} of {n} document(s) leaves no training document; "
            "use a smaller fraction, more documents, or data.valid_files"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[: n - n_valid]), sorted(order[n - n_valid :])


def _splits(data: DataSection, seed: int, want_train: bool = True) -> tuple[datasets.Dataset | None, datasets.Dataset | None]:
    if data.valid_fraction > 0:
        docs = _raw_split(data, "train")
        train_idx, valid_idx = _hold_out(len(docs), data.valid_fraction, seed)
        return docs.select(train_idx), docs.select(valid_idx)
    train = _raw_split(data, "train") if want_train else None
    return train, _raw_split(data, "valid")


def _texts(ds: datasets.Dataset) -> list[str]:
    if ds._indices is not None:
        ds = ds.flatten_indices(keep_in_memory=True)
    return ds.data.column("text").to_pylist()


def load_documents(data: DataSection, split: str, seed: int = 0) -> list[str]:
    """The documents of ``split`` ("train" or "valid"); ``[]`` for "valid" when none is configured.

    With ``data.valid_fraction`` both splits come from the training documents (seeded by ``seed``).
    """
    if split not in ("train", "valid"):
        raise ValueError(f"load_documents: split must be 'train' or 'valid', got {split!r}")
    train, valid = _splits(data, seed, want_train=split == "train")
    ds = train if split == "train" else valid
    return [] if ds is None else _texts(ds)


# -- tokenization ------------------------------------------------------------------------------
def _tokenize(ds: datasets.Dataset, tokenizer, desc: str, quiet: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every document, flat (int64), and each document's length."""
    import pyarrow.compute as pc

    if ds._indices is not None:
        ds = ds.flatten_indices(keep_in_memory=True)

    def encode(batch):
        enc = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False, verbose=False)
        return {"input_ids": enc["input_ids"]}

    tag = f"qat-tok:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}:{type(tokenizer).__name__}"
    with _quiet_progress(quiet):
        tok = _map(ds, encode, tag, desc=desc)
    flats, lengths = [], []
    for chunk in tok.data.column("input_ids").chunks:
        lengths.append(pc.list_value_length(chunk).to_numpy(zero_copy_only=False).astype(np.int64))
        flats.append(chunk.flatten().to_numpy(zero_copy_only=False).astype(np.int64))
    if not flats:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(flats), np.concatenate(lengths)


def _tokens_needed(lengths: np.ndarray, data: DataSection, packing: bool) -> int:
    """Tokens the blocks would keep out of documents of these lengths (for the early stop under a cap)."""
    if packing:
        return int(lengths.sum() + len(lengths))
    kept = np.minimum(lengths[lengths >= 2], data.seq_len)
    return int(kept.sum())


PIECE_CHARS = 1 << 20  # a document longer than this is tokenized a piece at a time under a token cap


def _tokenize_long(text: str, tokenizer, need: int) -> np.ndarray:
    """The leading token ids of one long document (at least ``need`` of them, or all), tokenized
    ``PIECE_CHARS`` at a time and cut before a space, where a byte-level pre-tokenizer would cut
    too; so a 50 MB line is not tokenized whole to use a few thousand tokens of it."""
    out, got, pos = [], 0, 0
    while pos < len(text) and got < need:
        end = min(len(text), pos + PIECE_CHARS)
        if end < len(text):
            cut = text.rfind(" ", pos + PIECE_CHARS // 2, end)
            end = cut if cut > pos else end
        ids = np.asarray(tokenizer(text[pos:end], add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"], np.int64)
        out.append(ids)
        got, pos = got + len(ids), end
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _tokenize_capped(ds, tokenizer, data: DataSection, max_tokens: int | None, desc: str):
    """Tokenize all documents, or (under a cap) only as many leading documents, and of a very long
    document only as many leading pieces, as the cap needs."""
    if max_tokens is None:
        return _tokenize(ds, tokenizer, desc, quiet=False)
    packing = data.packing
    target = max(1, max_tokens // data.seq_len) * data.seq_len if packing else max_tokens
    flats, lengths, got, start, step = [], [], 0, 0, 64
    while start < len(ds) and got < target:
        stop = min(len(ds), start + step)
        batch = ds.select(range(start, stop))
        if max(len(t or "") for t in batch["text"]) > PIECE_CHARS:  # a very long document: one at a time
            for text in batch["text"]:
                if got >= target:
                    break
                need = target - got + 1 if packing else data.seq_len  # a row holds a document's first seq_len tokens
                ids = _tokenize_long(text or "", tokenizer, need)
                flats.append(ids)
                lengths.append(np.array([len(ids)], np.int64))
                got += _tokens_needed(lengths[-1], data, packing)
        else:
            f, n = _tokenize(batch, tokenizer, desc, quiet=True)
            flats.append(f)
            lengths.append(n)
            got += _tokens_needed(n, data, packing)
        start, step = stop, step * 2
    if not flats:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(flats), np.concatenate(lengths)


def _blocks(flat: np.ndarray, lengths: np.ndarray, tokenizer, data: DataSection, max_tokens: int | None, what: str) -> TokenBlocks:
    seq_len = data.seq_len
    if data.packing:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("data.packing: the tokenizer has no eos_token, which packing puts between documents")
        total = int(lengths.sum() + len(lengths))
        stream = np.empty(total, dtype=np.int64)
        eos_pos = np.cumsum(lengths + 1) - (lengths + 1)
        is_tok = np.ones(total, dtype=bool)
        is_tok[eos_pos] = False
        stream[eos_pos] = eos
        stream[is_tok] = flat
        n_blocks = total // seq_len
        if n_blocks == 0:
            raise ValueError(
                f"data: the {what} set has {total} tokens, fewer than one block of data.seq_len={seq_len}"
            )
        if max_tokens is not None:
            n_blocks = min(n_blocks, max(1, max_tokens // seq_len))
        ids = torch.from_numpy(stream[: n_blocks * seq_len].reshape(n_blocks, seq_len).copy())
        return TokenBlocks(ids, torch.ones_like(ids))

    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        pad = 0  # masked out and ignored by the loss either way
    starts = np.cumsum(lengths) - lengths
    keep = lengths >= 2
    starts, kept = starts[keep], np.minimum(lengths[keep], seq_len)
    if len(kept) == 0:
        raise ValueError(
            f"data: the {what} set has {int(lengths.sum())} tokens in {len(lengths)} document(s), "
            "none with the 2 tokens a row needs (data.packing=false)"
        )
    if max_tokens is not None:
        n_rows = max(1, int(np.searchsorted(np.cumsum(kept), max_tokens, side="right")))
        starts, kept = starts[:n_rows], kept[:n_rows]
    n_rows = len(kept)
    ids = np.full((n_rows, seq_len), pad, dtype=np.int64)
    mask = np.zeros((n_rows, seq_len), dtype=np.int64)
    rows = np.repeat(np.arange(n_rows), kept)
    row_start = np.repeat(np.cumsum(kept) - kept, kept)
    cols = np.arange(int(kept.sum())) - row_start
    ids[rows, cols] = flat[np.repeat(starts, kept) + cols]
    mask[rows, cols] = 1
    return TokenBlocks(torch.from_numpy(ids), torch.from_numpy(mask))


def build_datasets(data: DataSection, tokenizer, seed: int = 0) -> tuple[TokenBlocks, TokenBlocks | None]:
    """Load, split, tokenize and block the training and (if configured) validation data."""
    train_docs, valid_docs = _splits(data, seed)
    flat, lengths = _tokenize_capped(train_docs, tokenizer, data, data.max_train_tokens, "Tokenizing train")
    train = _blocks(flat, lengths, tokenizer, data, data.max_train_tokens, "training")
    valid = None
    if valid_docs is not None:
        flat, lengths = _tokenize_capped(valid_docs, tokenizer, data, data.max_valid_tokens, "Tokenizing valid")
        valid = _blocks(flat, lengths, tokenizer, data, data.max_valid_tokens, "validation")
    return train, valid


# -- tokenizer training ------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` ids trained on ``texts``; ``<|endoftext|>`` = id 0 = bos/eos/pad/unk.

    Every byte is in the base alphabet, so no text maps to unk. Deterministic for the same texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(
            f"tokenizer.train_vocab_size: {vocab_size} is too small; a byte-level BPE needs at least "
            f"{len(alphabet) + 1} ids (256 bytes + {EOT})"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    if tok.token_to_id(EOT) != 0:  # pragma: no cover - the trainer adds special tokens first
        raise RuntimeError(f"train_tokenizer: {EOT} got id {tok.token_to_id(EOT)}, expected 0")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
