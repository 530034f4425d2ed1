"""Block-sparse causal attention: a fixed pattern over blocks of `block` positions (Sparse Transformer, BigBird).

Query block i attends key block j <= i when j is one of its `local` nearest blocks (its own included: i - j < local),
one of the `global` leading blocks (j < global), or, with a stride, a multiple of `stride` blocks back
((i - j) % stride == 0); inside its own block attention is causal. A sequence that is not a multiple of the block
ends in a shorter block.

Work scales with the blocks kept, never with T squared: on CPUs each query block gathers only its kept key blocks
and runs one SDPA over them (a boolean mask for causality inside the own block and for padding); on GPUs
flex_attention skips the blocks outside the pattern. With a soft-cap the softmax over the gathered blocks is
written out. The analysis counts exactly the (query, key) pairs of the pattern.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .. import Param, register, traced_shape
from ...ir import Call, ModelConfig
from .causal import ATTENTION_PARAMS, CausalAttention, attend_visible, store

MAX_BLOCKS = 1 << 20


@dataclass(frozen=True)
class Pattern:
    """Which key blocks each query block attends."""

    block: int
    local: int
    leading: int  # the `global` argument (a Python keyword)
    stride: int

    def keeps(self, query_block: torch.Tensor, key_block: torch.Tensor) -> torch.Tensor:
        """Whether query block i attends key block j (broadcasting tensors of block indices)."""
        back = query_block - key_block
        kept = (back < self.local) | (key_block < self.leading)
        if self.stride:
            kept = kept | (back % self.stride == 0)
        return (back >= 0) & kept

    def blocks_kept(self, query_block: int) -> int:
        """How many key blocks query block i attends: the union of three sets of distances i - j in [0, i], counted
        by inclusion-exclusion (local: [0, local); global: [i - global + 1, i]; strided: multiples of stride)."""
        end = query_block + 1  # distances 0..i
        near = (0, min(self.local, end))
        far = (max(0, end - self.leading), end)
        both = (max(near[0], far[0]), min(near[1], far[1]))
        width = lambda span: max(0, span[1] - span[0])  # noqa: E731
        count = width(near) + width(far) - width(both)
        if self.stride:
            multiples = lambda span: 0 if span[1] <= span[0] else (span[1] - 1) // self.stride - (span[0] - 1) // self.stride  # noqa: E731
            count += multiples((0, end)) - multiples(near) - multiples(far) + multiples(both)
        return count

    def attended_pairs(self, length: int) -> int:
        """(query, key) pairs one head scores over `length` positions: in each query block, every kept earlier block
        whole, and its own block, when kept, as a causal triangle."""
        pairs = 0
        for i in range(-(-length // self.block)):
            rows = min(self.block, length - i * self.block)
            own = int(self.local > 0 or i < self.leading or self.stride > 0)  # distance 0: local, global, or a multiple of stride
            pairs += (self.blocks_kept(i) - own) * rows * self.block + own * rows * (rows + 1) // 2
        return pairs

    def cache_positions(self, length: int) -> int:
        """Keys a decoder holds after `length` tokens: those in blocks the next query or any later one may attend
        (the global blocks and the last `local` ones; every earlier one under a stride)."""
        if self.stride:
            return length
        nxt = length // self.block
        kept = self.keeps(torch.tensor(nxt), torch.arange(nxt + 1))
        return sum(max(0, min(length, (j + 1) * self.block) - j * self.block) for j in kept.nonzero().flatten().tolist())


@functools.lru_cache(maxsize=8)
def gathering(pattern: Pattern, length: int, groups: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the key blocks it gathers (n, m) (index n: a padding block) and the additive mask (1, n,
    groups * block, m * block), 0 where a query row sees a gathered key (kept, causal, inside the sequence) and -inf
    elsewhere. Built on the CPU (the meta device has no values to size it by). Additive and 4-d: SDPA turns a boolean
    mask into this on every call, and leaves its fused CPU kernel for a 3-d one."""
    blocks = -(-length // pattern.block)
    query_block, key_block = torch.arange(blocks)[:, None], torch.arange(blocks)[None, :]
    kept = pattern.keeps(query_block, key_block)
    width = int(kept.sum(dim=1).max())
    index = torch.where(kept, key_block, blocks).sort(dim=1).values[:, :width]  # kept blocks first, ascending
    offsets = torch.arange(pattern.block)
    key = (index[:, :, None] * pattern.block + offsets).flatten(1)  # (n, m * block) positions; padding past the end
    query = query_block * pattern.block + offsets  # (n, block)
    real_block = (index < blocks).repeat_interleave(pattern.block, 1)
    visible = (key[:, None, :] <= query[:, :, None]) & (key[:, None, :] < length) & real_block[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
    return index, mask.repeat(1, groups, 1)[None]


def attend_gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float | None, softcap: float
                    ) -> torch.Tensor:
    """The CPU path: each query block with the key blocks it keeps, gathered, in one SDPA (or, soft-capped, one
    written-out softmax); the heads of a KV group share their gathered keys."""
    batch, heads, length, width = q.shape
    kv_heads, block = k.shape[1], pattern.block
    groups, blocks = heads // kv_heads, -(-length // block)
    index, mask = (t.to(q.device) for t in gathering(pattern, length, groups, q.dtype))
    pad = blocks * block - length

    def blocked(x: torch.Tensor) -> torch.Tensor:  # (B, H_kv, T, d) -> (B * H_kv, n + 1, block, d), the last block zero
        return F.pad(x, (0, 0, 0, pad + block)).reshape(batch * kv_heads, blocks + 1, block, x.shape[-1])

    keys = blocked(k)[:, index].flatten(2, 3)  # (B * H_kv, n, m * block, d)
    values = blocked(v)[:, index].flatten(2, 3)
    # query head h = kv_head * groups + g reads KV head h // groups: rows of a block are (g, position)
    queries = F.pad(q, (0, 0, 0, pad)).reshape(batch * kv_heads, groups, blocks, block, width).transpose(1, 2).flatten(2, 3)
    if softcap:
        scores = queries @ keys.transpose(-2, -1) * (scale if scale is not None else width ** -0.5)
        scores = softcap * torch.tanh(scores / softcap) + mask[0]
        out = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ values
    else:
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    out = out.unflatten(2, (groups, block)).transpose(1, 2)  # (B * H_kv, groups, n, block, d_v)
    return out.reshape(batch, heads, blocks * block, -1)[:, :, :length]


@functools.lru_cache(maxsize=8)
def pattern_block_mask(pattern: Pattern, length: int, device: torch.device) -> BlockMask:
    """flex_attention block mask of the pattern; its blocks wholly outside it are skipped."""

    def visible(b, h, q, k):
        return (k <= q) & pattern.keeps(q // pattern.block, k // pattern.block)

    return create_block_mask(visible, None, None, length, length, device=device)


def attend_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float | None, softcap: float
                ) -> torch.Tensor:
    """The GPU path: flex_attention with the pattern's block mask, the soft-cap as a score modification."""

    def capped(score, b, h, q_idx, k_idx):
        return softcap * torch.tanh(score / softcap)

    return flex_attention(q, k, v, score_mod=capped if softcap else None, block_mask=pattern_block_mask(pattern, q.shape[-2], q.device),
                          scale=scale, enable_gqa=True)


@register(
    "blocksparse",
    "mixer",
    Param("block", int, "positions per block", default=64, minimum=1, maximum=MAX_BLOCKS),
    Param("local", int, "nearest key blocks each query block attends, its own included (1: its own only)", default=4, minimum=0,
          maximum=MAX_BLOCKS),
    Param("global", int, "leading key blocks every query attends", default=1, minimum=0, maximum=MAX_BLOCKS),
    Param("stride", int, "also every stride-th block back from the query's own (0: none)", default=0, minimum=0, maximum=MAX_BLOCKS),
    *ATTENTION_PARAMS,
)
class BlockSparseAttention(CausalAttention):
    """Causal GQA over a fixed block pattern: local blocks, global leading blocks, an optional strided set."""

    def __init__(self, config: ModelConfig, block: int, local: int, stride: int, **attention: Any) -> None:
        leading = attention.pop("global")
        super().__init__(config, **attention)
        self.pattern = Pattern(block, local, leading, stride)

    @classmethod
    def check(cls, config: ModelConfig, **args: Any) -> str | None:
        if not (args["local"] or args["global"] or args["stride"]):
            return "local=0 with global=0 and no stride: a query past the first block would attend no key"
        return super().check(config, **args)

    @classmethod
    def describe(cls, call: Call, config: ModelConfig) -> list[str]:
        args = call.kwargs()
        strided = f", every {args['stride']}th" if args["stride"] else ""
        shape = f"blocks of {args['block']}: {args['local']} local, {args['global']} global{strided}"
        return [*super().describe(call, config), shape]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.is_cuda:
            return attend_flex(q, k, v, self.pattern, self.scale, self.softcap)
        # the meta device (the analysis) takes the SDPA form too: the soft-cap changes no product
        return attend_gathered(q, k, v, self.pattern, self.scale, 0.0 if q.is_meta else self.softcap)

    def decode(self, state: dict[str, torch.Tensor], start: int, x: torch.Tensor, cos: torch.Tensor | None = None,
               sin: torch.Tensor | None = None) -> torch.Tensor:
        """Every key is kept (global blocks reach back to the start); each new query attends where the pattern allows."""
        q, k, v, gate = self.heads(x, cos, sin)
        end = start + x.shape[1]
        store(state, torch.arange(start, end, device=x.device), k, v)
        query, key = torch.arange(start, end, device=x.device)[:, None], torch.arange(end, device=x.device)[None, :]
        visible = (key <= query) & self.pattern.keeps(query // self.pattern.block, key // self.pattern.block)
        return self.merge(attend_visible(q, state["keys"][:, :, :end], state["values"][:, :, :end], visible, self.scale, self.softcap),
                          gate)

    def attended_pairs(self, seq_len: int) -> int:
        return self.pattern.attended_pairs(seq_len)

    def cache_elements(self, seq_len: int) -> int:
        return 2 * self.n_kv_heads * self.head_dim * self.pattern.cache_positions(seq_len)

    def flop_handles(self, seq_len: int) -> dict[str, Callable]:
        pairs, kv_heads, heads = self.attended_pairs(seq_len), self.n_kv_heads, self.n_heads

        def count(inputs: list, outputs: list) -> int:  # SDPA over (B * H_kv, blocks, rows, d): count the pattern's pairs
            q, v = traced_shape(inputs[0]), traced_shape(inputs[2])
            return q[0] // kv_heads * heads * pairs * (q[-1] + v[-1])

        return {"aten::scaled_dot_product_attention": count}

    def extra_repr(self) -> str:
        p = self.pattern
        return f"{super().extra_repr()}, block={p.block}, local={p.local}, global={p.leading}, stride={p.stride}"
