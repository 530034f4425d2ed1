"""Synthetic probes scored by next-token accuracy: multi-query associative recall, copying, induction heads.

Every example is generated from a seed out of the run's own tokenizer: a pool of single tokens that are plain
words (` name`, `_path`, ...), so the probes read as text the model has seen pieces of. An example is a token
sequence and the positions whose next token is scored; accuracy is the share of those the model's argmax gets
right, reported per length (and as the mean over lengths).

- `mqar` (Zoology, Arora et al. 2023): n key-value pairs `k1 v1 ... kn vn`, then every key again in a shuffled
  order, each followed by its value; scored: the value after each queried key. Lengths: n pairs.
- `copy`: L random tokens, the EOS token, the same L tokens again; scored: every token of the copy. Lengths: L.
- `induction`: L distinct random tokens, then one of them (not the last) again and the token that followed it;
  scored: that last token (the pattern `A B ... A -> B`). Lengths: L.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RecipeError

EXAMPLES = 64  # examples per task and length
LENGTHS = {"mqar": (4, 8, 16, 32), "copy": (8, 16, 32, 64), "induction": (16, 32, 64, 128)}
WORD = re.compile(r"^ ?[A-Za-z_][A-Za-z_0-9]+$")


@dataclass(frozen=True)
class Example:
    """A token sequence and the (position, answer) pairs scored: the model reading tokens[:position] should predict answer."""

    tokens: tuple[int, ...]
    targets: tuple[tuple[int, int], ...]


def word_pool(tokenizer: Any) -> tuple[int, ...]:
    """The ids of the tokenizer's tokens that decode to one plain word, ascending."""
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    pool = tuple(i for i, text in enumerate(vocab) if WORD.match(text))
    if len(pool) < 512:
        raise RecipeError(f"eval_tasks: the tokenizer has only {len(pool)} single-word tokens; the probes need 512")
    return pool


def mqar(rng: random.Random, pool: tuple[int, ...], pairs: int, eos: int) -> Example:
    """n key-value pairs, then each key queried once (shuffled), each followed by its value; keys and values distinct."""
    drawn = rng.sample(pool, 2 * pairs)
    keys, values = drawn[:pairs], drawn[pairs:]
    context = [token for pair in zip(keys, values) for token in pair]
    order = list(range(pairs))
    rng.shuffle(order)
    tokens, targets = list(context), []
    for i in order:
        tokens.append(keys[i])
        targets.append((len(tokens), values[i]))
        tokens.append(values[i])
    return Example(tuple(tokens), tuple(targets))


def copy(rng: random.Random, pool: tuple[int, ...], length: int, eos: int) -> Example:
    """L random tokens, EOS, and the L tokens again: every token of the copy is scored."""
    text = [rng.choice(pool) for _ in range(length)]
    tokens = [*text, eos, *text]
    return Example(tuple(tokens), tuple((length + 1 + i, token) for i, token in enumerate(text)))


def induction(rng: random.Random, pool: tuple[int, ...], length: int, eos: int) -> Example:
    """L distinct tokens, then one of them (not the last) again and the token that followed it, which is scored."""
    text = rng.sample(pool, length)
    cue = rng.randrange(length - 1)
    return Example((*text, text[cue], text[cue + 1]), ((length + 1, text[cue + 1]),))


TASKS: dict[str, Callable[[random.Random, tuple[int, ...], int, int], Example]] = {"mqar": mqar, "copy": copy, "induction": induction}


def parse_tasks(text: str) -> tuple[str, ...]:
    """Task names separated by commas, each known."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        if name not in TASKS:
            raise RecipeError(f"unknown task '{name}': choose among {', '.join(TASKS)}")
    if not names:
        raise RecipeError("no task named: give some of " + ", ".join(TASKS))
    return names


def examples(name: str, length: int, pool: tuple[int, ...], eos: int, seed: int = 0, count: int = EXAMPLES) -> list[Example]:
    """A task's examples at one length from a tokenizer's word pool: the same for every run with that tokenizer and seed."""
    rng = random.Random(f"{name}/{length}/{seed}")
    return [TASKS[name](rng, pool, length, eos) for _ in range(count)]


def example_length(name: str, length: int) -> int:
    """Tokens in one example of a task at a length."""
    return {"mqar": 4 * length, "copy": 2 * length + 1, "induction": length + 2}[name]


@torch.no_grad()
def accuracy(model: Callable, batch: list[Example], micro_batch: int, device: torch.device) -> float:
    """The share of scored positions whose argmax prediction is the answer."""
    right = total = 0
    for start in range(0, len(batch), micro_batch):
        chunk = batch[start:start + micro_batch]
        tokens = torch.tensor([e.tokens for e in chunk], dtype=torch.long, device=device)
        logits, _ = model(tokens)
        predicted = logits.argmax(dim=-1).tolist()  # predicted[b][p - 1]: the model's guess for tokens[p]
        for row, example in zip(predicted, chunk):
            right += sum(row[position - 1] == answer for position, answer in example.targets)
            total += len(example.targets)
    return right / total


def score_tasks(model: Callable, tokenizer: Any, names: tuple[str, ...], seq_len: int, micro_batch: int, device: torch.device) -> dict[str, float]:
    """Accuracy of each task at each length that fits in seq_len (`mqar/16`), and its mean over them (`mqar`)."""
    scores: dict[str, float] = {}
    pool = word_pool(tokenizer)
    for name in names:
        per_length = {length: accuracy(model, examples(name, length, pool, tokenizer.eos_token_id), micro_batch, device)
                      for length in LENGTHS[name] if example_length(name, length) <= seq_len}
        scores.update({f"{name}/{length}": value for length, value in per_length.items()})
        if per_length:
            scores[name] = sum(per_length.values()) / len(per_length)
    return scores


def score_checkpoint(checkpoint: Any, names: tuple[str, ...]) -> dict[str, float]:
    """The tasks' scores of a checkpoint (its run's tokenizer and sequence length)."""
    from .tokenizer import load_tokenizer
    from .trainer import checkpoint_model

    model, recipe, manifest, device = checkpoint_model(checkpoint)
    return score_tasks(model, load_tokenizer(recipe.tokenizer), names, manifest["plan"]["seq_len"], manifest["plan"]["micro_batch_size"], device)
