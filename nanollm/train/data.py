"""Training data: a streaming document source -> held-out split -> shuffle buffer -> tokens -> packed rows.

Every stage is deterministic for a seed and its position is plain data (`state_dict`), so a resumed run
continues with exactly the rows it would have seen. Documents go to the held-out split by a hash of their
text, so the two splits never share a document, whatever the order or the number of epochs. The evaluation
set is chosen by that hash too, from the source in its own order, so it depends on the data alone.
"""
from __future__ import annotations

import bisect
import functools
import glob
import hashlib
import itertools
import os
import random
import sysconfig
import tokenize
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
import torch.distributed as dist

from ..components import distributed
from ..errors import DataError

LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# ---- sources ---------------------------------------------------------------------------------------


class Source(Protocol):
    """An endless iterator over documents (epoch after epoch) whose position is plain data."""

    name: str
    epoch: int  # completed passes over the whole source

    def __iter__(self) -> Source: ...

    def __next__(self) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@functools.cache
def stdlib_files() -> tuple[Path, ...]:
    """The Python standard library's own .py sources (third-party site-packages left out), sorted."""
    files = []
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "__pycache__")]
        files.extend(Path(folder) / name for name in names if name.endswith(".py"))
    return tuple(sorted(files))


def read_source_file(path: Path) -> str:
    """A Python source as text: UTF-8, else its PEP 263 coding declaration, else UTF-8 with replacement characters."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        with tokenize.open(path) as handle:  # honours `# -*- coding: koi8-r -*-` and the like
            return handle.read()
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return raw.decode("utf-8", errors="replace")


class StdlibSource:
    """The standard library's sources, one document per file, in a seeded order that changes each epoch (seed None: sorted)."""

    name = "python-stdlib"

    def __init__(self, seed: int | None) -> None:
        self.files, self.seed = stdlib_files(), seed
        self.epoch, self.index = 0, 0
        self._order: tuple[int, list[Path]] = (-1, [])
        if not self.files:
            raise DataError(f"no Python sources found under {sysconfig.get_paths()['stdlib']}")

    def order(self) -> list[Path]:
        """This epoch's file order."""
        if self._order[0] != self.epoch:
            files = list(self.files)
            if self.seed is not None:
                random.Random(f"{self.seed}/{self.epoch}").shuffle(files)
            self._order = (self.epoch, files)
        return self._order[1]

    def __iter__(self) -> StdlibSource:
        return self

    def __next__(self) -> str:
        if self.index == len(self.files):
            self.epoch, self.index = self.epoch + 1, 0
        path = self.order()[self.index]
        self.index += 1
        return read_source_file(path)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


class DatasetSource:
    """Local txt/jsonl/parquet files or a Hugging Face dataset, streamed through `datasets`, epoch after epoch."""

    def __init__(self, data: str, config: str | None, split: str, text_field: str) -> None:
        import datasets  # imported only for such sources: it takes a second

        self.name, self.text_field = data, text_field
        files = local_files(data)
        if files is not None:
            builder = LOCAL_FORMATS[files[0].suffix]
            if any(LOCAL_FORMATS[f.suffix] != builder for f in files):
                raise DataError(f"--data {data}: mixes file formats; give one of .txt, .jsonl, .parquet at a time")
            extra = {}
            if builder == "text":  # one document per file, whatever text_field says of structured rows
                extra, self.text_field = {"sample_by": "document", "encoding_errors": "replace"}, "text"
            try:
                self.dataset = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True, **extra)
            except StopIteration:  # the json builder's way of saying there is no row to infer columns from
                raise DataError(f"--data {data}: the corpus is empty") from None
            except Exception as error:  # pyarrow and the builders each raise their own kinds
                raise DataError(f"--data {data}: cannot read it as {builder} ({one_line(error)})") from None
        else:
            try:
                self.dataset = datasets.load_dataset(data, config, split=split, streaming=True)
            except Exception as error:  # the hub, the builder and the network each raise their own kinds
                raise DataError(f"--data {data}: not a local file and not loadable as a Hugging Face dataset ({one_line(error)})") from None
        self.start = self.dataset.state_dict()
        self.epoch, self.iterator = 0, iter(self.dataset)

    def __iter__(self) -> DatasetSource:
        return self

    def __next__(self) -> str:
        for attempt in range(2):
            try:
                row = next(self.iterator)
                break
            except StopIteration:
                if attempt:
                    raise DataError(f"--data {self.name}: the corpus is empty") from None
                self.epoch += 1
                self.dataset.load_state_dict(self.start)
                self.iterator = iter(self.dataset)
            except Exception as error:  # a malformed row surfaces only when it is read
                raise DataError(f"--data {self.name}: cannot read a row ({one_line(error)})") from None
        if self.text_field not in row:
            raise DataError(f"--data {self.name}: rows have no '{self.text_field}' field (fields: {', '.join(row)}); set text_field")
        text = row[self.text_field]
        return text if isinstance(text, str) else ""

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "dataset": self.dataset.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.dataset.load_state_dict(state["dataset"])
        self.iterator = iter(self.dataset)


def one_line(error: BaseException) -> str:
    """An exception as `Type: first line of its message`."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def local_files(data: str) -> list[Path] | None:
    """The local files `data` names (a file, a folder, or a glob), sorted; None if it names none and looks like a hub id."""
    path = Path(data)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_FORMATS)
        if not files:
            raise DataError(f"--data {data}: the folder holds no .txt, .jsonl or .parquet files")
    elif glob.has_magic(data):
        files = sorted(Path(p) for p in glob.glob(data, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"--data {data}: no file matches")
    elif data.startswith((".", "/", "~")) or path.suffix in LOCAL_FORMATS:
        raise DataError(f"--data {data}: no such file or folder")
    else:
        return None  # `owner/name` or `name`: a Hugging Face dataset
    for f in files:
        if f.suffix not in LOCAL_FORMATS:
            raise DataError(f"--data {f}: unsupported file type '{f.suffix}' (use .txt, .jsonl or .parquet)")
    return files


def open_source(data: str | None, config: str | None, split: str, text_field: str, seed: int | None) -> Source:
    """The document source a recipe names; seed None reads it in its own order (datasets are never reordered)."""
    if data is None:
        return StdlibSource(seed)
    return DatasetSource(data, config, split, text_field)


# ---- split, shuffle, tokenise, pack -------------------------------------------------------------------


def document_hash(text: str) -> int:
    """A document's stable 64-bit BLAKE2 hash: it decides the held-out split and orders the evaluation set."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest(), "big")


def held_out(text: str, share: float) -> bool:
    """Whether a document belongs to the evaluation split: a stable hash of its text below `share`."""
    return document_hash(text) < share * 2**64


class Tokenizer(Protocol):
    """What the pipeline needs of a Hugging Face tokenizer."""

    eos_token_id: int | None

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


def document_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """A document's tokens, then EOS, as packing lays them out."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]


class TrainingDocuments:
    """The source's documents outside the held-out split, through a seeded shuffle buffer."""

    def __init__(self, source: Source, eval_share: float, buffer_size: int, seed: int) -> None:
        self.source, self.eval_share, self.buffer_size = source, eval_share, buffer_size
        self.rng = random.Random(seed)
        self.buffer: list[str] = []

    def next_document(self) -> str:
        epoch = self.source.epoch
        while True:
            text = next(self.source)
            if text and not held_out(text, self.eval_share):
                return text
            if self.source.epoch > epoch + 1:
                raise DataError(f"--data {self.source.name}: every document is empty or held out; lower eval_share")

    def __call__(self) -> str:
        """A document out of the shuffle buffer (filled first), chosen by the seeded generator."""
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self.next_document())
        index = self.rng.randrange(len(self.buffer))
        self.buffer[index], self.buffer[-1] = self.buffer[-1], self.buffer[index]
        return self.buffer.pop()

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"source": self.source.state_dict(), "buffer": list(self.buffer), "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["source"])
        self.buffer = list(state["buffer"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


class PackedRows:
    """Rows of seq_len + 1 tokens: each document's tokens, then EOS, back to back.

    Consecutive rows overlap by one token (a row's last token is the next row's first), so every token
    of the stream is a prediction target exactly once and nothing is dropped.
    """

    def __init__(self, documents: Callable[[], str], tokenizer: Tokenizer, seq_len: int) -> None:
        self.documents, self.tokenizer, self.seq_len = documents, tokenizer, seq_len
        self.tokens: list[int] = []  # the stream's tokens not yet used as a target, the next row's first included

    def tokenize_more(self) -> None:
        """Add the next documents' tokens to the stream: one document, or in several processes one per process, each
        tokenised by one process and shared with all, so that each process tokenises its share of the documents."""
        if not distributed():
            self.tokens.extend(document_tokens(self.tokenizer, self.documents()))
            return
        texts = [self.documents() for _ in range(dist.get_world_size())]  # the same documents in every process
        shared: list[list[int] | None] = [None] * len(texts)
        dist.all_gather_object(shared, document_tokens(self.tokenizer, texts[dist.get_rank()]))
        for tokens in shared:
            self.tokens.extend(tokens)

    def next_row(self) -> list[int]:
        """seq_len + 1 tokens (StopIteration when the documents end first)."""
        while len(self.tokens) <= self.seq_len:
            self.tokenize_more()
        row = self.tokens[: self.seq_len + 1]
        del self.tokens[: self.seq_len]
        return row

    def next_rows(self, count: int, keep: slice = slice(None)) -> torch.Tensor:
        """The `keep` rows (all by default) of the next `count`, as a LongTensor of seq_len + 1 columns."""
        return torch.tensor([self.next_row() for _ in range(count)][keep], dtype=torch.long)


class TrainingRows(PackedRows):
    """The training stream; its position (source, shuffle buffer, unused tokens) is plain data."""

    def __init__(self, source: Source, tokenizer: Tokenizer, seq_len: int, eval_share: float, shuffle_buffer: int, seed: int) -> None:
        super().__init__(TrainingDocuments(source, eval_share, shuffle_buffer, seed), tokenizer, seq_len)

    @property
    def name(self) -> str:
        """The source's name."""
        return self.documents.source.name

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position."""
        return {"documents": self.documents.state_dict(), "tokens": list(self.tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.documents.load_state_dict(state["documents"])
        self.tokens = list(state["tokens"])


def heldout_rows(source: Source, tokenizer: Tokenizer, seq_len: int, eval_share: float, max_tokens: int, scan: int | None) -> torch.Tensor:
    """The evaluation set, up to `max_tokens` targets packed as training packs them: the distinct held-out documents
    of smallest hash among the first `scan` documents of `source` (read in its own order; all of it when None)."""

    def candidates() -> Iterator[tuple[tuple[int, str], Callable[[], list[int]]]]:
        for _ in itertools.count() if scan is None else range(scan):
            text = next(source)
            if source.epoch > 0:
                break
            if text and held_out(text, eval_share):
                yield (document_hash(text), text), functools.partial(document_tokens, tokenizer, text)

    return choose_heldout(candidates(), seq_len, max_tokens, source.name)


def choose_heldout(candidates: Iterable[tuple[tuple[int, Any], Callable[[], list[int]]]], seq_len: int, max_tokens: int, name: str) -> torch.Tensor:
    """The evaluation rows from held-out documents given as ((hash, identity), their tokens when asked): the distinct ones of
    smallest key, up to `max_tokens` targets. One pass, tokenising only the documents that can still be chosen: memory
    is about `max_tokens`."""
    count = max(1, max_tokens // seq_len)
    needed = count * seq_len + 1  # the packed stream: every target, and the first row's first token
    chosen: list[tuple[tuple[int, Any], list[int]]] = []  # (key, tokens), sorted
    total = 0  # tokens in `chosen`
    for key, tokens_of in candidates:
        position = bisect.bisect_left(chosen, key, key=lambda entry: entry[0])
        if (position < len(chosen) and chosen[position][0] == key) or (position == len(chosen) and total >= needed):
            continue  # a repeat of a chosen document, or after every document of a set already full
        tokens = tokens_of()
        chosen.insert(position, (key, tokens))
        total += len(tokens)
        while total - len(chosen[-1][1]) >= needed:  # the last one is no longer needed
            total -= len(chosen.pop()[1])
    stream = torch.tensor([token for _, tokens in chosen for token in tokens], dtype=torch.long)
    if len(stream) <= seq_len:
        raise DataError(f"--data {name}: the held-out split has less than one sequence of {seq_len} tokens; raise eval_share (or eval_scan, if the source has more documents)")
    return stream.unfold(0, seq_len + 1, seq_len)[:count].clone()  # rows overlapping by one token, as in training
