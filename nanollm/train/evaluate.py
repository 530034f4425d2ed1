"""Held-out evaluation: cross-entropy with its standard error, perplexity, and bits per byte (which compares across tokenizers)."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..components import distributed


@dataclass(frozen=True)
class HeldOut:
    """The evaluation rows and the UTF-8 bytes their targets decode to."""

    rows: torch.Tensor  # (n, seq_len + 1), consecutive rows overlapping by one token
    bytes: int

    @classmethod
    def build(cls, rows: torch.Tensor, tokenizer: Any) -> HeldOut:
        """Count the bytes of the target stream once: rows overlap by one token, so the targets are each row's tail."""
        targets = rows[:, 1:].flatten().tolist()
        text = tokenizer.decode(targets, skip_special_tokens=True)
        return cls(rows, len(text.encode("utf-8")))

    @property
    def tokens(self) -> int:
        """Target tokens scored."""
        return self.rows[:, 1:].numel()

    @property
    def sequences(self) -> int:
        """Rows scored."""
        return len(self.rows)

    @property
    def fingerprint(self) -> str:
        """16 hex digits of BLAKE2 over the rows' shape and tokens: two runs with one fingerprint scored the same tokens."""
        shape = "x".join(map(str, self.rows.shape)).encode()
        return hashlib.blake2b(shape + self.rows.numpy().astype("<i8").tobytes(), digest_size=8).hexdigest()


@torch.no_grad()
def evaluate(model: Callable, held_out: HeldOut, micro_batch: int, device: torch.device) -> dict[str, float]:
    """Mean held-out loss (nats/token) and its standard error over the sequences, perplexity and bits per byte.

    The rows are split over processes. Every process runs the same number of forward passes (sharded models
    gather weights collectively), padding its share with copies of the first row whose losses are dropped.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    count = len(held_out.rows)
    mine = torch.arange(rank, count, world)
    padding = torch.zeros(math.ceil(count / world) - len(mine), dtype=torch.long)
    sums = []  # nats per row
    for index in torch.cat([mine, padding]).split(micro_batch):
        rows = held_out.rows[index].to(device)
        logits, _ = model(rows[:, :-1])
        losses = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
        sums.append(losses.view(len(rows), -1).double().sum(dim=1))
    nats = torch.zeros(count, dtype=torch.float64, device=device)  # every row's nats, each filled by one process
    nats[mine.to(device)] = torch.cat(sums)[: len(mine)]
    if world > 1:
        dist.all_reduce(nats)
    per_sequence = nats / held_out.rows[:, 1:].shape[1]  # rows score equally many tokens: the mean of these is the loss
    total = nats.sum().item()
    loss = total / held_out.tokens
    stderr = per_sequence.std().item() / math.sqrt(count) if count > 1 else math.nan
    return {"loss": loss, "loss_stderr": stderr, "perplexity": math.exp(min(loss, 700)),
            "bits_per_byte": total / math.log(2) / max(1, held_out.bytes)}
