"""qat.data: loading (files / hf / python-stdlib), splits, packing, padding, caps, tokenizer training."""

from __future__ import annotations

import gzip
import json
import random
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from qat.data import TokenBlocks, build_datasets, load_documents, python_stdlib_files, train_tokenizer
from qat.recipe import DataSection

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EOT = "<|endoftext|>"

WORDS = (
    "the quick brown fox jumps over lazy dog while a small cat sleeps under warm sun and birds sing "
    "in tall green trees near quiet river where fish swim slowly past old stones"
).split()


def _doc(rng: random.Random, n_words: int) -> str:
    lines = []
    while n_words > 0:
        k = min(n_words, rng.randint(3, 12))
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return "\n".join(lines)  # multi-line: documents must not be cut at line breaks


@pytest.fixture(autouse=True, scope="module")
def _datasets_cache(tmp_path_factory):
    """Keep load_dataset's cache (arrow files, extracted .gz) out of ~/.cache."""
    import datasets.config as cfg

    root = tmp_path_factory.mktemp("hf_datasets_cache")
    saved = (cfg.HF_DATASETS_CACHE, cfg.DOWNLOADED_DATASETS_PATH, cfg.EXTRACTED_DATASETS_PATH)
    cfg.HF_DATASETS_CACHE = root
    cfg.DOWNLOADED_DATASETS_PATH = root / "downloads"
    cfg.EXTRACTED_DATASETS_PATH = root / "downloads" / "extracted"
    yield
    cfg.HF_DATASETS_CACHE, cfg.DOWNLOADED_DATASETS_PATH, cfg.EXTRACTED_DATASETS_PATH = saved


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    rng = random.Random(0)
    return [_doc(rng, rng.randint(5, 60)) for _ in range(40)]


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, vocab_size=320)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _stream(tok, docs: list[str]) -> list[int]:
    out = []
    for d in docs:
        out += [tok.eos_token_id] + _ids(tok, d)
    return out


def _write_text(path: Path, text: str) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


# -- TokenBlocks --------------------------------------------------------------------------------
def test_token_blocks_items_and_labels():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    tb = TokenBlocks(ids, mask)
    assert len(tb) == 2 and tb.n_tokens == 5 and tb.seq_len == 4
    item = tb[1]
    assert item["input_ids"].tolist() == [8, 9, 0, 0]
    assert item["attention_mask"].tolist() == [1, 1, 0, 0]
    assert item["labels"].tolist() == [8, 9, -100, -100]
    assert item["input_ids"].dtype == torch.long
    batch = torch.utils.data.default_collate([tb[0], tb[1]])
    assert batch["labels"].shape == (2, 4)
    with pytest.raises(ValueError):
        TokenBlocks(torch.zeros(3, dtype=torch.long))


# -- files: text ----------------------------------------------------------------------------------
def test_packing_equals_manual_eos_join(tmp_path, tok, corpus):
    docs = corpus[:6]
    for i, d in reversed(list(enumerate(docs))):  # written last-first: the glob expansion must sort
        _write_text(tmp_path / f"d{i}.txt", d)
    data = DataSection(files=[str(tmp_path / "d*.txt")], seq_len=16)
    assert load_documents(data, "train") == docs  # whole files, newlines kept
    train, valid = build_datasets(data, tok)
    assert valid is None
    stream = _stream(tok, docs)
    n = len(stream) // 16
    assert len(train) == n and n >= 2
    assert train.input_ids.tolist() == [stream[i * 16 : (i + 1) * 16] for i in range(n)]
    assert train.attention_mask.eq(1).all() and train.n_tokens == n * 16
    assert train.input_ids[0, 0].item() == tok.eos_token_id


def test_doc_separator_and_gzip(tmp_path, tok, corpus):
    sep = f"\n{EOT}\n"
    docs = corpus[:5]
    text = "".join(d + sep for d in docs[:3]) + sep  # an empty document in between
    _write_text(tmp_path / "a.txt.gz", text)
    _write_text(tmp_path / "b.txt", "".join(d + sep for d in docs[3:]))
    data = DataSection(files=[str(tmp_path / "a.txt.gz"), str(tmp_path / "b.txt")], doc_separator=sep, seq_len=8)
    got = load_documents(data, "train")
    assert got == docs
    train, _ = build_datasets(data, tok)
    stream = _stream(tok, docs)
    assert train.input_ids.flatten().tolist() == stream[: len(stream) // 8 * 8]
    # without the separator each file is one document, separator text included
    whole = load_documents(DataSection(files=[str(tmp_path / "b.txt")], seq_len=8), "train")
    assert whole == ["".join(d + sep for d in docs[3:])]


def test_no_packing_pads_truncates_and_masks(tmp_path, tok):
    docs = ["hello", "the quick brown fox jumps over the lazy dog " * 4, "a small cat sleeps"]
    sep = "\n\n\n"
    _write_text(tmp_path / "x.text", sep.join(docs))
    data = DataSection(files=[str(tmp_path / "x.text")], doc_separator=sep, seq_len=12, packing=False)
    train, _ = build_datasets(data, tok)
    lens = [len(_ids(tok, d)) for d in docs]
    kept = [d for d, n in zip(docs, lens) if n >= 2]
    assert len(train) == len(kept)
    pad = tok.pad_token_id
    for row, d in enumerate(kept):
        ids = _ids(tok, d)[:12]
        item = train[row]
        assert item["input_ids"][: len(ids)].tolist() == ids
        assert item["input_ids"][len(ids) :].eq(pad).all()
        assert item["attention_mask"].tolist() == [1] * len(ids) + [0] * (12 - len(ids))
        assert item["labels"].tolist() == ids + [-100] * (12 - len(ids))
    assert max(lens) > 12  # the long one was truncated
    assert train.n_tokens == sum(min(n, 12) for n in lens if n >= 2)


def test_no_packing_drops_single_token_rows(tmp_path, tok):
    _write_text(tmp_path / "a.txt", "a")
    _write_text(tmp_path / "b.txt", "the quick brown fox")
    assert len(_ids(tok, "a")) == 1
    data = DataSection(files=[str(tmp_path / "*.txt")], seq_len=32, packing=False)
    train, _ = build_datasets(data, tok)
    assert len(train) == 1 and train.n_tokens == len(_ids(tok, "the quick brown fox"))
    only_short = DataSection(files=[str(tmp_path / "a.txt")], seq_len=32, packing=False)
    with pytest.raises(ValueError, match=r"^data: the training set .* none with the 2 tokens"):
        build_datasets(only_short, tok)


# -- files: json / parquet ------------------------------------------------------------------------
def test_jsonl_json_parquet_text_field(tmp_path, tok, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = corpus[:6]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs[:2])) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"body": d, "id": 0} for d in docs[2:4]]))
    pq.write_table(pa.table({"body": docs[4:], "id": [1, 2]}), tmp_path / "c.parquet")

    js = DataSection(files=[str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.json")], text_field="body", seq_len=8)
    assert load_documents(js, "train") == docs[:4]
    pa_ = DataSection(files=[str(tmp_path / "c.parquet")], text_field="body", seq_len=8)
    assert load_documents(pa_, "train") == docs[4:]
    train, _ = build_datasets(pa_, tok)
    stream = _stream(tok, docs[4:])
    assert train.input_ids.flatten().tolist() == stream[: len(stream) // 8 * 8]

    with pytest.raises(ValueError, match=r"^data\.text_field: column 'text' not found.*body"):
        load_documents(DataSection(files=[str(tmp_path / "c.parquet")]), "train")
    with pytest.raises(ValueError, match=r"^data\.text_field: column 'id'.*expected strings"):
        load_documents(DataSection(files=[str(tmp_path / "c.parquet")], text_field="id"), "train")
    # explicit format for an unknown extension; mixed formats refused under auto
    (tmp_path / "d.data").write_text(json.dumps({"body": "x y z"}) + "\n")
    assert load_documents(DataSection(files=[str(tmp_path / "d.data")], format="json", text_field="body"), "train") == ["x y z"]
    with pytest.raises(ValueError, match=r"^data\.files: cannot tell the format"):
        load_documents(DataSection(files=[str(tmp_path / "d.data")]), "train")
    with pytest.raises(ValueError, match=r"^data\.files: files of different formats"):
        load_documents(DataSection(files=[str(tmp_path / "b.json"), str(tmp_path / "c.parquet")]), "train")


# -- errors -----------------------------------------------------------------------------------------
def test_empty_and_missing_inputs_fail_clearly(tmp_path, tok):
    sep = f"\n{EOT}\n"
    _write_text(tmp_path / "empty.txt", f"{sep}  \n{sep}\n")
    data = DataSection(files=[str(tmp_path / "empty.txt")], doc_separator=sep)
    with pytest.raises(ValueError, match=r"^data\.files: .* produced no documents"):
        build_datasets(data, tok)
    _write_text(tmp_path / "zero.txt", "")
    with pytest.raises(ValueError, match=r"^data\.files: .* produced no documents"):
        load_documents(DataSection(files=[str(tmp_path / "zero.txt")]), "train")
    _write_text(tmp_path / "short.txt", "the quick brown fox")
    with pytest.raises(ValueError, match=r"^data: the training set has \d+ tokens, fewer than one block of data\.seq_len=512"):
        build_datasets(DataSection(files=[str(tmp_path / "short.txt")]), tok)
    with pytest.raises(ValueError, match=r"^data\.files: no file matches"):
        load_documents(DataSection(files=[str(tmp_path / "nope*.txt")]), "train")
    ok = DataSection(files=[str(tmp_path / "short.txt")], seq_len=2, valid_files=[str(tmp_path / "empty.txt")], doc_separator=sep)
    with pytest.raises(ValueError, match=r"^data\.valid_files: .* produced no documents"):
        build_datasets(ok, tok)
    with pytest.raises(ValueError, match=r"data\.valid_split is only for data\.source 'hf'"):  # the schema refuses it
        DataSection(files=[str(tmp_path / "short.txt")], seq_len=2, valid_split="validation")
    with pytest.raises(ValueError, match=r"^data\.valid_fraction: .* leaves no training document"):
        build_datasets(DataSection(files=[str(tmp_path / "short.txt")], seq_len=2, valid_fraction=0.5), tok)


# -- validation ---------------------------------------------------------------------------------
def test_valid_fraction_disjoint_and_deterministic(tmp_path, tok, corpus):
    sep = "\n###\n"
    _write_text(tmp_path / "all.txt", sep.join(corpus))
    data = DataSection(files=[str(tmp_path / "all.txt")], doc_separator=sep, valid_fraction=0.2, seq_len=8)
    tr, va = load_documents(data, "train", seed=3), load_documents(data, "valid", seed=3)
    assert len(va) == 8 and len(tr) == 32
    assert set(tr).isdisjoint(va) and sorted(tr + va) == sorted(corpus)
    assert [d for d in corpus if d in set(tr)] == tr  # kept in file order
    assert load_documents(data, "valid", seed=3) == va
    assert load_documents(data, "valid", seed=4) != va
    a_tr, a_va = build_datasets(data, tok, seed=3)
    b_tr, b_va = build_datasets(data, tok, seed=3)
    assert torch.equal(a_tr.input_ids, b_tr.input_ids) and torch.equal(a_va.input_ids, b_va.input_ids)
    stream = _stream(tok, va)
    assert a_va.input_ids.flatten().tolist() == stream[: len(stream) // 8 * 8]
    tiny = DataSection(files=[str(tmp_path / "all.txt")], doc_separator=sep, valid_fraction=0.001)
    assert len(load_documents(tiny, "valid")) == 1  # at least one document
    assert load_documents(DataSection(files=[str(tmp_path / "all.txt")]), "valid") == []


def test_valid_files(tmp_path, tok, corpus):
    _write_text(tmp_path / "t.txt", corpus[0] + "\n" + corpus[1])
    _write_text(tmp_path / "v.txt", corpus[2])
    data = DataSection(files=[str(tmp_path / "t.txt")], valid_files=str(tmp_path / "v.txt"), seq_len=4)
    train, valid = build_datasets(data, tok)
    assert load_documents(data, "valid") == [corpus[2]]
    stream = _stream(tok, [corpus[2]])
    assert valid.input_ids.flatten().tolist() == stream[: len(stream) // 4 * 4]
    assert len(train) > 0


# -- caps ---------------------------------------------------------------------------------------------
def test_max_tokens_caps_to_leading_blocks(tmp_path, tok, corpus):
    sep = "\n###\n"
    _write_text(tmp_path / "all.txt", sep.join(corpus))
    base = dict(files=[str(tmp_path / "all.txt")], doc_separator=sep, seq_len=8)
    full, _ = build_datasets(DataSection(**base), tok)
    capped, _ = build_datasets(DataSection(**base, max_train_tokens=30), tok)
    assert len(capped) == 3 and capped.n_tokens == 24
    assert torch.equal(capped.input_ids, full.input_ids[:3])
    one, _ = build_datasets(DataSection(**base, max_train_tokens=3), tok)  # at least one block
    assert len(one) == 1 and torch.equal(one.input_ids, full.input_ids[:1])
    # no packing: whole rows, first ones, total real tokens <= cap (but at least one row)
    nb = dict(base, packing=False, seq_len=64)
    rows, _ = build_datasets(DataSection(**nb), tok)
    cum = rows.attention_mask.sum(1).cumsum(0)
    cap = int(cum[4]) + 1
    r, _ = build_datasets(DataSection(**nb, max_train_tokens=cap), tok)
    assert len(r) == 5 and torch.equal(r.input_ids, rows.input_ids[:5]) and r.n_tokens <= cap
    r1, _ = build_datasets(DataSection(**nb, max_train_tokens=1), tok)
    assert len(r1) == 1
    # the valid cap is separate
    tr, va = build_datasets(DataSection(**base, valid_fraction=0.25, max_valid_tokens=16), tok)
    assert len(va) == 2 and len(tr) > 2


# -- hf source (a local directory) -----------------------------------------------------------------
def test_hf_source_local_directory(tmp_path, tok, corpus):
    d = tmp_path / "myset"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[:10]))
    (d / "validation.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[10:13]))
    data = DataSection(source="hf", name=str(d), valid_split="validation", seq_len=8)
    assert load_documents(data, "train") == corpus[:10]
    assert load_documents(data, "valid") == corpus[10:13]
    train, valid = build_datasets(data, tok)
    stream = _stream(tok, corpus[10:13])
    assert valid.input_ids.flatten().tolist() == stream[: len(stream) // 8 * 8]
    with pytest.raises(ValueError, match=r"^data\.valid_split: could not load split 'test'"):
        load_documents(DataSection(source="hf", name=str(d), valid_split="test"), "valid")


# -- python-stdlib ----------------------------------------------------------------------------------
def test_python_stdlib_source_deterministic(tok):
    files = python_stdlib_files()
    assert len(files) > 100 and files == python_stdlib_files()
    root = sysconfig.get_paths()["stdlib"]
    parts = {p for f in files for p in Path(f).relative_to(root).parts[:-1]}
    assert parts.isdisjoint({"site-packages", "test", "tests", "idlelib", "lib2to3"})
    t = time.perf_counter()
    docs = load_documents(DataSection(source="python-stdlib"), "train")
    load_s = time.perf_counter() - t
    assert len(docs) > 100 and any("def " in d for d in docs[:20])
    assert load_s < 20, f"loading the stdlib corpus took {load_s:.1f}s"
    data = DataSection(source="python-stdlib", seq_len=32, max_train_tokens=320, valid_fraction=0.05, max_valid_tokens=64)
    a_tr, a_va = build_datasets(data, tok)
    b_tr, b_va = build_datasets(data, tok)
    assert len(a_tr) == 10 and len(a_va) == 2
    assert torch.equal(a_tr.input_ids, b_tr.input_ids) and torch.equal(a_va.input_ids, b_va.input_ids)


# -- tokenizer training --------------------------------------------------------------------------
def test_train_tokenizer_roundtrip(tmp_path, corpus):
    from transformers import AutoTokenizer

    tok = train_tokenizer(corpus, vocab_size=300)
    assert len(tok) <= 300 and len(tok) >= 290
    assert tok.eos_token == tok.pad_token == tok.bos_token == tok.unk_token == EOT
    assert tok.eos_token_id == tok.pad_token_id == 0
    again = train_tokenizer(iter(corpus), vocab_size=300)
    assert again.get_vocab() == tok.get_vocab()
    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.eos_token_id == 0 and loaded.pad_token_id == 0 and loaded.bos_token == EOT
    for text in ["The quick brown fox.\n\n  Jumps over\tthe dog!", "naïve café — 東京 🙂 <tag> x=1;", corpus[3]]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert loaded(text, add_special_tokens=False)["input_ids"] == ids
        assert loaded.decode(ids) == text and tok.decode(ids) == text
    assert 0 in _ids(loaded, f"fox{EOT}dog")  # the special token is recognised in text
    with pytest.raises(ValueError, match=r"^tokenizer\.train_vocab_size"):
        train_tokenizer(corpus, vocab_size=256)


# -- the shared books corpus ------------------------------------------------------------------
def _shared_or_skip() -> Path:
    if not (SHARED / "data" / "books.train.txt.gz").is_file():
        pytest.skip("../shared not found (fixtures live beside the repo; CI has them)")
    return SHARED


def test_books_with_llama_tiny_tokenizer():
    from transformers import AutoTokenizer

    shared = _shared_or_skip()
    tok = AutoTokenizer.from_pretrained(shared / "models" / "llama-tiny")
    assert tok.eos_token_id == 0
    data = DataSection(
        files=[str(shared / "data" / "books.train.txt.gz")],
        valid_files=[str(shared / "data" / "books.valid.txt.gz")],
        doc_separator=f"\n{EOT}\n",
        seq_len=512,
    )
    t = time.perf_counter()
    train, valid = build_datasets(data, tok)
    elapsed = time.perf_counter() - t
    # data/README.md: train 1,475 docs, 3,704,861 tokens eos-joined; valid 87 docs, 206,342 tokens.
    # Those counts have an eos at both ends (n_docs + 1 eos); our stream has one before each document.
    assert train.n_tokens == (3_704_861 - 1) // 512 * 512 == 7236 * 512
    assert valid.n_tokens == (206_342 - 1) // 512 * 512 == 403 * 512
    assert train.input_ids[0, 0].item() == 0 and valid.input_ids[0, 0].item() == 0
    assert elapsed < 60, f"books tokenization took {elapsed:.1f}s"
    docs = load_documents(data, "valid")
    assert len(docs) == 87 and not any(EOT in d for d in docs)
    assert len(load_documents(data, "train")) == 1475
