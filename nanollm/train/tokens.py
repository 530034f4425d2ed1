"""A corpus tokenised once (`nanollm tokenize`) and trained from many times (`--data DIR`), with no tokeniser in the loop.

The folder holds the training documents' tokens and the held-out documents' tokens, each document followed by EOS
as packing lays it out, back to back in memory-mapped shards (`train-<k>.bin`, `heldout-<k>.bin`, uint16 or
uint32), an index per split (`train.npy`: shard, start, length and position in the source of each document;
`heldout.npy`: the same and the document's hash), and `tokens.json`: the source, the tokenizer, the held-out share
and the counts. Training reads it in the order the source itself would give: the same shuffle buffer, the same
packing, so its rows are those tokenised on the fly; each process reads only the tokens of its own rows.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..errors import DataError
from .data import (
    TrainingDocuments,
    choose_heldout,
    document_hash,
    document_tokens,
    held_out,
    open_source,
)

MANIFEST = "tokens.json"
FORMAT = 1
SHARD_TOKENS = 2**28  # tokens per shard file at most (a document is never split)


def is_token_folder(data: str | None) -> bool:
    """Whether `data` names a folder `nanollm tokenize` wrote."""
    return data is not None and (Path(data) / MANIFEST).is_file()


class ShardWriter:
    """Appends documents' tokens to `<split>-<k>.bin` files, a new one when the current would pass SHARD_TOKENS."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.files: list[str] = []
        self.handle: Any = None
        self.filled = 0
        self.tokens = 0

    def append(self, tokens: list[int]) -> tuple[int, int]:
        """Write one document; returns (shard, start)."""
        if self.handle is None or self.filled and self.filled + len(tokens) > self.shard_tokens:
            self.close()
            self.files.append(f"{self.split}-{len(self.files):05d}.bin")
            self.handle, self.filled = open(self.folder / self.files[-1], "wb"), 0  # noqa: SIM115 (open across appends; closed by close())
        start = self.filled
        self.handle.write(np.asarray(tokens, dtype=self.dtype).tobytes())
        self.filled += len(tokens)
        self.tokens += len(tokens)
        return len(self.files) - 1, start

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def tokenize_corpus(data: str | None, out: Path, tokenizer: Any, tokenizer_name: str | None, data_config: str | None = None,
                    data_split: str = "train", text_field: str = "text", eval_share: float = 0.02,
                    shard_tokens: int = SHARD_TOKENS, report: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Tokenise one pass of a source into `out` (written beside it, then renamed into place); returns the manifest."""
    if out.exists():
        raise DataError(f"-o {out}: already exists; choose another folder")
    source = open_source(data, data_config, data_split, text_field, seed=None)  # its own order, as the evaluation set reads it
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    dtype = np.dtype("<u2") if len(tokenizer) <= 2**16 else np.dtype("<u4")
    writers = {split: ShardWriter(staging, split, dtype, shard_tokens) for split in ("train", "heldout")}
    index: dict[str, list[list[int]]] = {"train": [], "heldout": []}
    seen: set[bytes] = set()  # held-out texts already kept: the evaluation set takes each document once
    position = 0
    for position in itertools.count():
        text = next(source)
        if source.epoch > 0:
            break
        if report is not None and position % 1000 == 0:
            report(position)
        if not text:
            continue
        split = "heldout" if held_out(text, eval_share) else "train"
        extra = []
        if split == "heldout":
            digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=16).digest()
            if digest in seen:
                continue
            seen.add(digest)
            extra = [np.uint64(document_hash(text)).view(np.int64).item()]
        tokens = document_tokens(tokenizer, text)
        index[split].append([*writers[split].append(tokens), len(tokens), position, *extra])
    for split, writer in writers.items():
        writer.close()
        np.save(staging / f"{split}.npy", np.asarray(index[split], dtype=np.int64).reshape(-1, 4 if split == "train" else 5))
    if not index["train"]:
        shutil.rmtree(staging)
        raise DataError(f"--data {source.name}: every document is empty or held out; lower --eval-share")
    manifest = {
        "format": FORMAT,
        "source": {"data": data, "data_config": data_config, "data_split": data_split, "text_field": text_field, "name": source.name},
        "tokenizer": tokenizer_name or "embedded", "vocab": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
        "eval_share": eval_share, "dtype": dtype.str,
        # the embedded corpus is read in a new seeded order each epoch, datasets in their own
        "reshuffles": data is None, "source_documents": position,
        "documents": {split: len(rows) for split, rows in index.items()},
        "tokens": {split: writer.tokens for split, writer in writers.items()},
        "shards": {split: writer.files for split, writer in writers.items()},
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    staging.rename(out)
    return manifest


class TokenFolder:
    """A tokenised corpus, memory-mapped: each document's tokens read on demand."""

    def __init__(self, path: str, tokenizer: Any, tokenizer_name: str | None, eval_share: float) -> None:
        self.path = Path(path)
        self.manifest = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        wanted = tokenizer_name or "embedded"
        if self.manifest["tokenizer"] != wanted or self.manifest["vocab"] != len(tokenizer):
            raise DataError(f"--data {path}: tokenised with tokenizer {self.manifest['tokenizer']} ({self.manifest['vocab']} tokens), "
                            f"not {wanted} ({len(tokenizer)}): train with --tokenizer {self.manifest['tokenizer']}")
        if self.manifest["eval_share"] != eval_share:
            raise DataError(f"--data {path}: its held-out split is eval_share {self.manifest['eval_share']}, not {eval_share}: "
                            f"train with --eval-share {self.manifest['eval_share']} or tokenise again")
        self.name = f"{path} (tokenised {self.manifest['source']['name']})"
        dtype = np.dtype(self.manifest["dtype"])
        self.shards = {split: [np.memmap(self.path / name, dtype=dtype, mode="r") for name in names]
                       for split, names in self.manifest["shards"].items()}
        self.index = {split: np.load(self.path / f"{split}.npy", allow_pickle=False) for split in ("train", "heldout")}

    def tokens(self, split: str, document: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens [start, stop) of a document of a split."""
        shard, offset, length = self.index[split][document][:3]
        return self.shards[split][shard][offset + start: offset + (length if stop is None else stop)]

    def length(self, document: int) -> int:
        """A training document's token count."""
        return int(self.index["train"][document][2])

    def heldout_rows(self, seq_len: int, max_tokens: int, scan: int | None) -> torch.Tensor:
        """The evaluation set `heldout_rows` chooses from the source, chosen from the stored held-out documents."""
        index = self.index["heldout"]

        def candidates() -> Iterator[tuple[tuple[int, int], Callable[[], list[int]]]]:
            for document, (_, _, _, position, signed_hash) in enumerate(index.tolist()):
                if scan is None or position < scan:
                    yield (signed_hash % 2**64, position), lambda document=document: self.tokens("heldout", document).tolist()

        return choose_heldout(candidates(), seq_len, max_tokens, self.name)


class DocumentOrder:
    """The training documents in the order the source gives them, epoch after epoch; its position is plain data."""

    def __init__(self, folder: TokenFolder, seed: int) -> None:
        self.folder, self.seed, self.name = folder, seed, folder.name
        self.epoch, self.index = 0, 0
        self.by_position = {position: document for document, position in enumerate(folder.index["train"][:, 3].tolist())}
        self._order: tuple[int, list[int]] = (-1, [])

    def order(self) -> list[int]:
        """This epoch's documents: the source's own order, or the embedded corpus's seeded reshuffle of every file."""
        if self._order[0] != self.epoch:
            positions = list(range(self.folder.manifest["source_documents"]))
            if self.folder.manifest["reshuffles"]:
                random.Random(f"{self.seed}/{self.epoch}").shuffle(positions)  # the permutation StdlibSource applies to its files
            self._order = (self.epoch, [self.by_position[p] for p in positions if p in self.by_position])
        return self._order[1]

    def __iter__(self) -> DocumentOrder:
        return self

    def __next__(self) -> int:
        if self.index == len(self.order()):
            self.epoch, self.index = self.epoch + 1, 0
        document = self.order()[self.index]
        self.index += 1
        return document

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


class TokenDocuments(TrainingDocuments):
    """The training documents (numbers) through the seeded shuffle buffer on-the-fly text goes through."""

    def next_document(self) -> int:  # the held-out split was taken out when tokenising
        return next(self.source)


class TokenRows:
    """The packed training rows of a tokenised corpus: the stream on-the-fly packing makes, read only where a process
    keeps its rows. The position (documents not yet used up, and how far into the first) is plain data."""

    def __init__(self, folder: TokenFolder, seq_len: int, shuffle_buffer: int, seed: int) -> None:
        self.folder, self.seq_len, self.name = folder, seq_len, folder.name
        self.documents = TokenDocuments(DocumentOrder(folder, seed), 0.0, shuffle_buffer, seed)
        self.pending: list[int] = []  # documents of the stream not used up, in order
        self.start = 0  # the stream's next token: this far into pending[0]

    def next_rows(self, count: int, keep: slice = slice(None)) -> torch.Tensor:
        """The `keep` rows of the next `count` (seq_len + 1 tokens each, overlapping by one), reading only their tokens."""
        needed = self.start + count * self.seq_len + 1
        available = sum(self.folder.length(d) for d in self.pending)
        while available < needed:
            self.pending.append(self.documents())
            available += self.folder.length(self.pending[-1])
        rows = [self.read(self.start + row * self.seq_len, self.seq_len + 1) for row in range(count)[keep]]
        self.start += count * self.seq_len
        while self.start >= self.folder.length(self.pending[0]):  # the next row starts past it
            self.start -= self.folder.length(self.pending.pop(0))
        return torch.from_numpy(np.stack(rows).astype(np.int64)) if rows else torch.empty(0, self.seq_len + 1, dtype=torch.long)

    def read(self, offset: int, length: int) -> np.ndarray:
        """`length` tokens of the pending stream from `offset`."""
        pieces = []
        for document in self.pending:
            size = self.folder.length(document)
            if offset < size:
                piece = self.folder.tokens("train", document, offset, min(size, offset + length))
                pieces.append(piece)
                length -= len(piece)
                if not length:
                    break
            offset = max(0, offset - size)
        return np.concatenate(pieces)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position."""
        return {"documents": self.documents.state_dict(), "pending": list(self.pending), "start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.documents.load_state_dict(state["documents"])
        self.pending, self.start = list(state["pending"]), state["start"]
