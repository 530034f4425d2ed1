"""Tokenizers: any Hugging Face tokenizer, or the embedded one that needs no download.

The embedded tokenizer is a byte-level BPE (GPT-2 style, 8192 tokens, `<|endoftext|>` as EOS) trained
once on the Python standard library's sources with Hugging Face `tokenizers`, cached on disk, and loaded
back as a transformers tokenizer, so the rest of the runtime sees one kind of object.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ..cache import cache_dir
from ..errors import DataError
from .data import one_line, read_source_file, stdlib_files

EMBEDDED_VOCAB = 8192
EOS = "<|endoftext|>"


def embedded_tokenizer_dir() -> Path:
    """The cache folder of the embedded tokenizer for this Python's standard library (trained on first use)."""
    import tokenizers

    files = stdlib_files()
    fingerprint = hashlib.sha256()
    for path in files:
        fingerprint.update(f"{path.name}:{path.stat().st_size}\n".encode())
    key = f"{sys.version_info.major}.{sys.version_info.minor}-{fingerprint.hexdigest()[:12]}-v{EMBEDDED_VOCAB}-tok{tokenizers.__version__}"
    target = cache_dir() / "tokenizers" / f"stdlib-bpe-{key}"
    if not (target / "tokenizer.json").is_file():
        train_embedded(files, target)
    return target


def train_embedded(files: Sequence[Path], target: Path) -> None:
    """Train the byte-level BPE on the given sources and save it, atomically, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=EMBEDDED_VOCAB, min_frequency=2, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator((read_source_file(path) for path in files), trainer, length=len(files))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".train-"))
    wrapped.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(staging, ignore_errors=True)


def load_tokenizer(name: str | None) -> Any:
    """A transformers tokenizer: the embedded one (None), or AutoTokenizer on a directory or hub name; it must have an EOS."""
    from transformers import AutoTokenizer

    path = embedded_tokenizer_dir() if name is None else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # transformers raises OSError, ValueError, or the hub client's errors
        raise DataError(f"--tokenizer {name}: cannot load it ({one_line(error)})") from None
    if tokenizer.eos_token_id is None:
        raise DataError(f"--tokenizer {name}: the tokenizer has no EOS token, which separates packed documents")
    return tokenizer
