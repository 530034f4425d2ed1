"""Engram (DeepSeek and PKU, "Conditional Memory via Scalable Lookup", arXiv 2601.07372): hashed n-gram memory.

From the token ids, canonicalised (token ids that differ only in case, accents, Unicode form or whitespace share
one id), each order n = 2..N hashes the last n ids with `heads` hash heads into tables of distinct prime sizes:
mix = (t0 m0) XOR (t1 m1) XOR ... (t_k the id k tokens back, m_k odd multipliers), row = mix mod p. The rows
looked up, concatenated, are e (B, T, (N-1) dim). A context-aware gate alpha = sigmoid(RMSNorm(W_K e) .
RMSNorm(h) / sqrt(d)) scales the value v = W_V e, and a short depthwise causal convolution refines it:
out = alpha v + SiLU(conv(RMSNorm(alpha v))). The layer's residual scheme adds out to the stream before the mixer.

Hashing is integer torch (meta device, torch.compile). A lookup costs no FLOPs and a token touches (N-1) heads
rows: the tables are memory, not compute, and the accounting says so.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...cache import cache_dir
from ...ir import MAX_WIDTH, ModelConfig
from .. import (
    BRANCH,
    INIT_STD,
    TABLE,
    TOKEN_IDS,
    Component,
    Input,
    Param,
    make_norm,
    register,
)
from ..conv import CausalConv1d

MAX_ROWS = 1 << 31


def is_prime(number: int) -> bool:
    """Whether `number` is prime (trial division: table sizes are at most 2^31)."""
    if number < 2:
        return False
    if number % 2 == 0:
        return number == 2
    return all(number % k for k in range(3, math.isqrt(number) + 1, 2))


def next_prime(number: int) -> int:
    """The smallest prime at or above `number`."""
    while not is_prime(number):
        number += 1
    return number


def table_sizes(rows: int, orders: int, heads: int, primes: bool) -> list[int]:
    """Rows of each (order, head) table, orders 2..N outer: distinct primes upward from `rows`, or `rows` each."""
    if not primes:
        return [rows] * ((orders - 1) * heads)
    sizes = [rows]
    while len(sizes) < (orders - 1) * heads:
        sizes.append(next_prime(sizes[-1] + 1))
    return sizes


def multipliers(orders: int, id_bound: int, seed: int) -> torch.Tensor:
    """Odd hash multipliers, one per position back (N), small enough that id x multiplier never overflows int64."""
    half_bound = max(1, (torch.iinfo(torch.int64).max // id_bound) // 2)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, half_bound, (orders,), generator=generator, dtype=torch.int64) * 2 + 1


def ngram_rows(ids: torch.Tensor, factors: torch.Tensor, moduli: torch.Tensor, offsets: torch.Tensor, heads: int, pad: int) -> torch.Tensor:
    """(B, T) canonical ids -> (B, T, (N-1) heads) rows of the concatenated tables; row t depends only on ids[t-N+1 .. t]."""
    mix = ids * factors[0]
    hashes = []
    for back in range(1, factors.shape[0]):
        shifted = F.pad(ids[..., :-back], (back, 0), value=pad) if ids.shape[-1] > back else torch.full_like(ids, pad)
        mix = torch.bitwise_xor(mix, shifted * factors[back])
        hashes.append(mix.unsqueeze(-1).expand(*mix.shape, heads))  # order back+1, one column per head
    return torch.remainder(torch.cat(hashes, dim=-1), moduli) + offsets


def engram_gate(key: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """sigmoid(k . q / sqrt(d)) per token, (B, T, 1), the dot product as a matmul (counted as d multiply-adds)."""
    return torch.sigmoid((key.unsqueeze(-2) @ query.unsqueeze(-1)).squeeze(-1) / math.sqrt(key.shape[-1]))


# ---- the tokenizer side: canonical token ids -------------------------------------------------------------------


def canonical_text(text: str) -> str:
    """NFKC, NFD, accents stripped, lower case, whitespace runs collapsed to one space (the paper's compression)."""
    text = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    text = "".join(c for c in text if unicodedata.category(c) != "Mn").lower()
    return re.sub(r"\s+", " ", text)


def canonical_table(tokenizer: Any) -> list[int]:
    """Token id -> canonical id (dense, in order of first appearance). A token that decodes to no whole character
    (part of a UTF-8 sequence, shown as U+FFFD) keeps an id of its own."""
    canonical: dict[str, int] = {}
    table = []
    for token in range(len(tokenizer)):
        text = tokenizer.decode([token])
        key = canonical_text(text) if "\ufffd" not in text else f"\ufffd{token}"
        table.append(canonical.setdefault(key, len(canonical)))
    return table


def canonical_ids(tokenizer: Any) -> torch.Tensor:
    """The canonical id of every token of a tokenizer, built once per vocabulary and cached on disk (nanollm's cache folder)."""
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    path = cache_dir() / "engram" / f"canonical-{hashlib.sha256(vocabulary.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return torch.tensor(json.loads(path.read_text()), dtype=torch.int64)
    table = canonical_table(tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{id(table)}.tmp")
    staging.write_text(json.dumps(table))
    staging.replace(path)  # atomic: concurrent builders write the same content
    return torch.tensor(table, dtype=torch.int64)


# ---- the component --------------------------------------------------------------------------------------------


@register(
    "engram",
    "memory",
    Param("orders", int, "largest n-gram order N: orders 2..N are looked up", default=3, minimum=2, maximum=8),
    Param("heads", int, "hash heads (tables) per order", default=4, minimum=1, maximum=64),
    Param("rows", int, "rows of the first table; the others take the next primes above it (`primes`)", default=65537,
          minimum=2, maximum=MAX_ROWS),
    Param("dim", int, "memory width per order, split over its heads (the paper's n_embed_per_ngram)", setting="d_model",
          minimum=1, maximum=MAX_WIDTH, width=True, positional=False),
    Param("kernel", int, "taps of the short depthwise causal convolution", default=4, minimum=1, maximum=64, positional=False),
    Param("dilation", int, "the convolution's dilation; 0 is the largest order N, as the paper's code", default=0, minimum=0,
          positional=False),
    Param("primes", bool, "table sizes are distinct primes (rows must be prime); false: every table has `rows` rows",
          default=True, positional=False),
    Param("seed", int, "seed of the hash multipliers", default=0, minimum=0, positional=False),
)
class Engram(Component):
    """Hashed n-gram memory gated by the hidden state, with a short causal convolution (DeepSeek's Engram)."""

    fixed_state = True  # the convolution's last inputs

    def __init__(self, config: ModelConfig, orders: int, heads: int, rows: int, dim: int, kernel: int, dilation: int,
                 primes: bool, seed: int) -> None:
        super().__init__()
        self.orders, self.heads, self.seed, self.vocab_size = orders, heads, seed, config.vocab_size
        self.sizes = table_sizes(rows, orders, heads, primes)
        width = (orders - 1) * dim
        self.table = nn.Parameter(torch.empty(sum(self.sizes), dim // heads))
        self.key_proj = nn.Linear(width, config.d_model)
        self.value_proj = nn.Linear(width, config.d_model)
        self.key_norm = make_norm(config, config.d_model)
        self.query_norm = make_norm(config, config.d_model)
        self.conv_norm = make_norm(config, config.d_model)
        self.conv = CausalConv1d(config.d_model, kernel, dilation=dilation or orders)
        self.register_buffer("canonical", torch.empty(config.vocab_size, dtype=torch.int64))  # token id -> canonical id
        self.register_buffer("factors", torch.empty(orders, dtype=torch.int64), persistent=False)
        self.register_buffer("moduli", torch.empty(len(self.sizes), dtype=torch.int64), persistent=False)
        self.register_buffer("offsets", torch.empty(len(self.sizes), dtype=torch.int64), persistent=False)

    @classmethod
    def check(cls, config: ModelConfig, **args: Any) -> str | None:
        if args["dim"] % args["heads"]:
            return f"dim={args['dim']} does not split into heads={args['heads']} equal parts"
        if args["primes"] and not is_prime(args["rows"]):
            below = next((k for k in range(args["rows"] - 1, 1, -1) if is_prime(k)), None)
            return (f"rows={args['rows']} is not prime (tables are sized by distinct primes): the nearest are "
                    f"{below} and {next_prime(args['rows'])}, or give primes=false")
        return None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.table, std=INIT_STD)
        self.canonical.copy_(torch.arange(self.vocab_size))  # identity until `use_tokenizer`
        self.factors.copy_(multipliers(self.orders, self.vocab_size + 1, self.seed))
        self.moduli.copy_(torch.tensor(self.sizes))
        self.offsets.copy_(torch.tensor([0, *self.sizes[:-1]]).cumsum(0))

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Key the n-grams by the tokenizer's canonical ids (ids past the tokenizer's vocabulary keep ids of their own)."""
        table = canonical_ids(tokenizer)[: self.vocab_size].to(self.canonical.device)
        extra = torch.arange(self.vocab_size - table.shape[0], device=table.device) + int(table.max()) + 1
        self.canonical.copy_(torch.cat([table, extra]))

    def inputs(self) -> tuple[Input, ...]:
        return (BRANCH, TOKEN_IDS)

    def rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The table rows each token looks up, (B, T, (N-1) heads)."""
        return ngram_rows(self.canonical[token_ids], self.factors, self.moduli, self.offsets, self.heads, pad=self.vocab_size)

    def memory(self, rows: torch.Tensor) -> torch.Tensor:
        """e: the looked-up rows concatenated, (B, T, (N-1) dim)."""
        return F.embedding(rows, self.table).flatten(-2)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return self.read(x, self.rows(token_ids), self.conv)

    def read(self, x: torch.Tensor, rows: torch.Tensor, convolve: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The output at x (B, T, d_model) of the table rows its tokens look up, the gated value through `convolve`."""
        e = self.memory(rows).to(x.dtype)
        gated = engram_gate(self.key_norm(self.key_proj(e)), self.query_norm(x)) * self.value_proj(e)
        return gated + F.silu(convolve(self.conv_norm(gated)))

    def state(self, batch: int, capacity: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The convolution's last inputs and the canonical ids of the last N-1 tokens (the padding id before the first)."""
        return {"conv": self.conv.state(batch, device, dtype),
                "ids": torch.full((batch, self.orders - 1), self.vocab_size, dtype=torch.int64, device=device)}

    def decode(self, state: dict[str, torch.Tensor], start: int, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        # the n-grams of the new tokens reach back into the earlier ones: hash them after the last N-1 ids, keep the new rows
        ids = torch.cat([state["ids"], self.canonical[token_ids]], dim=1)
        rows = ngram_rows(ids, self.factors, self.moduli, self.offsets, self.heads, pad=self.vocab_size)[:, self.orders - 1:]
        state["ids"].copy_(ids[:, ids.shape[1] - state["ids"].shape[1]:])
        return self.read(x, rows, functools.partial(self.conv.decode, past=state["conv"]))

    def active_params(self) -> int:
        """Everything but the tables, and the rows one token touches ((N-1) heads rows)."""
        table = self.table.numel()
        return sum(p.numel() for p in self.parameters()) - table + (self.orders - 1) * self.heads * self.table.shape[1]

    def memory_params(self) -> int:
        return self.table.numel()

    def cache_elements(self, seq_len: int) -> int:
        """The convolution's window of past values (the last N-1 token ids of its decoding state are ids, not cache)."""
        return (self.conv.span - 1) * self.conv.weight.shape[0]

    def param_roles(self) -> dict[str, str]:
        """The tables are embedding-like whatever their shape: AdamW, never Muon."""
        return {"table": TABLE}
