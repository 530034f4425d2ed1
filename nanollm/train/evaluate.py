"""Held-out evaluation: cross-entropy, perplexity, and bits per byte (which compares across tokenizers)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import distributed


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


@torch.no_grad()
def evaluate(model: Callable, held_out: HeldOut, micro_batch: int, device: torch.device) -> dict[str, float]:
    """Mean held-out loss (nats/token), perplexity and bits per byte; the rows are split over processes.

    Every process runs the same number of forward passes (sharded models gather weights collectively),
    padding its share with weightless copies of a row.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    mine = held_out.rows[rank::world]
    share = math.ceil(len(held_out.rows) / world)
    weights = torch.ones(share)
    if len(mine) < share:
        weights[len(mine):] = 0
        mine = torch.cat([mine, held_out.rows[:1].expand(share - len(mine), -1)])
    total = torch.zeros((), dtype=torch.float64, device=device)
    for rows, weight in zip(mine.split(micro_batch), weights.split(micro_batch)):
        rows, weight = rows.to(device), weight.to(device)
        logits, _ = model(rows[:, :-1])
        losses = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
        total += (losses.view(len(rows), -1).sum(dim=1) * weight).sum().double()
    if world > 1:
        dist.all_reduce(total)
    nats = total.item()
    loss = nats / held_out.tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_byte": nats / math.log(2) / max(1, held_out.bytes)}
