"""The data pipeline: reading, the held-out split, shuffling, packing, and resuming mid-stream."""
from __future__ import annotations

import json
import random
from itertools import islice

import pytest
import torch

from nanollm.errors import DataError
from nanollm.train.data import (
    DatasetSource,
    PackedRows,
    StdlibSource,
    TrainingDocuments,
    TrainingRows,
    document_hash,
    held_out,
    heldout_rows,
    read_source_file,
)


class CharTokenizer:
    """One token per character (its code point + 1); EOS is 0. Enough to see every token move."""

    eos_token_id = 0

    def __call__(self, text: str, **kwargs) -> dict:
        return {"input_ids": [ord(c) + 1 for c in text]}


class ListSource:
    """An in-memory source: the documents in order, epoch after epoch."""

    name = "list"

    def __init__(self, documents: list[str]) -> None:
        self.documents, self.epoch, self.index = documents, 0, 0

    def __iter__(self) -> ListSource:
        return self

    def __next__(self) -> str:
        if self.index == len(self.documents):
            self.epoch, self.index = self.epoch + 1, 0
        self.index += 1
        return self.documents[self.index - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


DOCS = [f"document {i}: " + "abcdefghij"[: i % 10 + 1] * (i % 7 + 1) for i in range(40)]


@pytest.mark.parametrize("seq_len", [1, 5, 16, 64])
def test_packing_keeps_every_token_in_order(seq_len):
    """The rows, with each row's first token dropped after the first row, are the documents with EOS between them."""
    documents = iter(DOCS)
    packer = PackedRows(lambda: next(documents), CharTokenizer(), seq_len)
    rows = []
    with pytest.raises(StopIteration):
        while True:
            rows.append(packer.next_row())
    assert all(len(row) == seq_len + 1 for row in rows)
    assert all(a[-1] == b[0] for a, b in zip(rows, rows[1:]))  # consecutive rows share one token
    stream = rows[0] + [t for row in rows[1:] for t in row[1:]]
    expected = [t for doc in DOCS for t in CharTokenizer()(doc)["input_ids"] + [0]]
    assert stream == expected[: len(stream)]
    assert len(expected) - len(stream) < seq_len + 1  # only the unfinished last row is still pending
    assert stream + packer.tokens[1:] == expected  # ... and nothing is lost: it waits in the packer


def stream_of(rows: torch.Tensor) -> list[int]:
    """The token stream packed rows hold (each row after the first repeats the previous row's last token)."""
    return rows[0].tolist() + [t for row in rows[1:].tolist() for t in row[1:]]


def tokens_of(documents: list[str]) -> list[int]:
    return [t for doc in documents for t in CharTokenizer()(doc)["input_ids"] + [0]]


def test_split_is_by_content_and_disjoint():
    share = 0.25
    documents = TrainingDocuments(ListSource(DOCS), share, buffer_size=1, seed=0)
    training = [documents() for _ in range(len(DOCS) * 2)]
    held = {doc for doc in DOCS if held_out(doc, share)}
    assert 0 < len(held) < len(DOCS)
    assert not held & set(training)
    assert set(training) == set(DOCS) - held  # two epochs of the rest
    rows = heldout_rows(ListSource(DOCS + DOCS[:5]), CharTokenizer(), 8, share, max_tokens=10_000, scan=None)
    by_hash = sorted(held, key=document_hash)
    assert stream_of(rows) == tokens_of(by_hash)[: len(stream_of(rows))]  # every held-out document once, in hash order
    assert len(tokens_of(by_hash)) - len(stream_of(rows)) < 8  # all of them: the set asked for more than there is


def test_the_evaluation_set_depends_on_the_documents_alone():
    """Any order of the source gives the same rows; the set is the held-out documents of smallest hash, just enough
    of them; a larger set extends a smaller one; and only the first `scan` documents are read."""
    share, seq_len = 0.5, 8
    by_hash = sorted((doc for doc in DOCS if held_out(doc, share)), key=document_hash)
    reference = heldout_rows(ListSource(DOCS), CharTokenizer(), seq_len, share, max_tokens=48, scan=None)
    for seed in range(3):
        shuffled = random.Random(seed).sample(DOCS, len(DOCS))
        assert torch.equal(heldout_rows(ListSource(shuffled), CharTokenizer(), seq_len, share, max_tokens=48, scan=None), reference)
    assert reference.shape == (6, seq_len + 1)
    needed = [doc for i, doc in enumerate(by_hash) if len(tokens_of(by_hash[:i])) <= 48]  # until the stream has 48 + 1 tokens
    assert stream_of(reference) == tokens_of(needed)[:49]
    larger = heldout_rows(ListSource(DOCS), CharTokenizer(), seq_len, share, max_tokens=200, scan=None)
    assert torch.equal(larger[:6], reference)
    source = ListSource(DOCS)
    first = heldout_rows(source, CharTokenizer(), seq_len, share, max_tokens=48, scan=20)
    assert source.index == 20
    assert torch.equal(first, heldout_rows(ListSource(DOCS[:20]), CharTokenizer(), seq_len, share, max_tokens=48, scan=None))


def test_the_evaluation_set_is_the_same_for_every_seed():
    """The embedded corpus, whose training order the seed shuffles, gives one evaluation set for every seed: read
    whole, or only its first documents (in their sorted order). Taken in the seed's order, as before, these
    8,192 tokens differed between seeds 0 and 1."""
    from nanollm.train.recipe import Recipe
    from nanollm.train.tokenizer import load_tokenizer
    from nanollm.train.trainer import held_out_set

    tokenizer = load_tokenizer(None)
    for scan in (None, 600):
        sets = [held_out_set(Recipe(seed=seed, eval_tokens=8192, eval_scan=scan), tokenizer, 64) for seed in (0, 1)]
        assert sets[0].tokens == 8192 and torch.equal(sets[0].rows, sets[1].rows) and sets[0].fingerprint == sets[1].fingerprint
    assert StdlibSource(seed=0).order() != StdlibSource(seed=1).order()  # while training reads them in other orders


def test_heldout_needs_one_sequence():
    with pytest.raises(DataError, match="held-out split"):
        heldout_rows(ListSource(DOCS), CharTokenizer(), 8, 0.0, max_tokens=64, scan=None)


def test_everything_held_out_is_an_error():
    documents = TrainingDocuments(ListSource(DOCS), 1.0, buffer_size=4, seed=0)
    with pytest.raises(DataError, match="held out"):
        documents()


def test_shuffle_buffer_is_seeded_and_mixes():
    def order(seed: int) -> list[str]:
        documents = TrainingDocuments(ListSource(DOCS), 0.0, buffer_size=8, seed=seed)
        return [documents() for _ in range(30)]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1) != DOCS[:30]


def test_resume_mid_stream_gives_the_same_rows():
    def make() -> TrainingRows:
        return TrainingRows(ListSource(DOCS), CharTokenizer(), seq_len=7, eval_share=0.1, shuffle_buffer=5, seed=3)

    reference = make()
    expected = reference.next_rows(60)
    first = make()
    head = first.next_rows(23)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints hold it as JSON
    second = make()
    second.load_state_dict(state)
    assert torch.equal(torch.cat([head, second.next_rows(37)]), expected)


def test_stdlib_source_reads_every_file_each_epoch_in_a_new_order():
    source = StdlibSource(seed=0)
    count = len(source.files)
    first = source.order()
    assert sorted(first) == sorted(source.files) and first != list(source.files)
    list(islice(source, count))
    assert source.epoch == 0
    next(source)
    assert source.epoch == 1 and source.order() != first


def test_non_utf8_sources_are_repaired_or_replaced(tmp_path):
    latin = tmp_path / "latin.py"
    latin.write_bytes("# -*- coding: iso-8859-1 -*-\ns = 'café'\n".encode("iso-8859-1"))
    cyrillic = tmp_path / "koi8.py"
    cyrillic.write_bytes("# coding: koi8-r\ns = 'привет'\n".encode("koi8-r"))
    broken = tmp_path / "broken.py"
    broken.write_bytes(b"s = '\xff\xfe not utf-8'\n")
    assert "café" in read_source_file(latin)
    assert "привет" in read_source_file(cyrillic)
    assert read_source_file(broken) == "s = '\ufffd\ufffd not utf-8'\n"


def test_the_stdlib_corpus_reads_whole():
    """Every file of this Python's standard library is read, the few non-UTF-8 ones included."""
    source = StdlibSource(seed=0)
    texts = [read_source_file(path) for path in source.files]
    assert len(texts) > 1000 and sum(map(len, texts)) > 10_000_000


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".txt"])
def test_local_files_through_datasets(tmp_path, suffix):
    texts = [f"row {i} " * (i + 1) for i in range(12)]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": texts}), path)
    else:
        for i, text in enumerate(texts):  # a folder of text files: one document each
            (tmp_path / f"doc{i:02d}.txt").write_text(text)
        path = tmp_path
    source = DatasetSource(str(path), None, "train", "body")
    read = [next(source) for _ in range(len(texts))]
    assert read == texts
    state = source.state_dict()
    assert next(source) == texts[0] and source.epoch == 1  # a second epoch starts over
    again = DatasetSource(str(path), None, "train", "body")
    again.load_state_dict(json.loads(json.dumps(state)))
    assert next(again) == texts[0]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: str(p / "missing.jsonl"), "no such file"),
        (lambda p: (p / "empty.jsonl").write_text("") and str(p / "empty.jsonl") or str(p / "empty.jsonl"), "empty"),
        (lambda p: (p / "f.csv").write_text("a") and str(p / "f.csv"), "unsupported file type"),
        (lambda p: (p / "empty_dir").mkdir() or str(p / "empty_dir"), "holds no"),
    ],
    ids=["missing", "empty", "csv", "empty-folder"],
)
def test_bad_data_is_a_clear_error(tmp_path, setup, message):
    with pytest.raises(DataError, match=message) as error:
        source = DatasetSource(setup(tmp_path), None, "train", "text")
        next(source)
    assert "\n" not in str(error.value)


def test_missing_text_field_is_named(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match="no 'text' field .*content"):
        next(DatasetSource(str(path), None, "train", "text"))
