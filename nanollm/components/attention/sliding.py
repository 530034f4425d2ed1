"""Sliding-window causal attention: each query sees itself and the window-1 tokens before it."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .. import Param, register
from ...ir import ModelConfig
from .causal import CausalAttention


def window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, T) mask, True where query q may attend key k: k <= q and q - k < window."""
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    return (k <= q) & (q - k < window)


@functools.lru_cache(maxsize=8)
def window_block_mask(length: int, window: int, device: torch.device) -> BlockMask:
    """flex_attention block mask of the same window; blocks wholly outside it are skipped."""

    def in_window(b, h, q, k):
        return (k <= q) & (q - k < window)

    return create_block_mask(in_window, None, None, length, length, device=device)


@register(
    "sliding",
    "mixer",
    Param("window", int, "keys each query attends, itself included", default=4096, minimum=1, carry=True),
)
class SlidingWindowAttention(CausalAttention):
    """Causal GQA restricted to the most recent `window` positions."""

    def __init__(self, config: ModelConfig, window: int) -> None:
        super().__init__(config)
        self.window = window

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # flex_attention has no backward on CPU in this torch: it runs on GPU, masked SDPA elsewhere.
        if q.is_cuda:
            return self.attend_flex(q, k, v)
        return self.attend_masked(q, k, v)

    def attend_masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Reference path: SDPA with an explicit boolean window mask (trains on every device)."""
        mask = window_mask(q.shape[-2], self.window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def attend_flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Block-sparse path: flex_attention skips the blocks outside the window."""
        block_mask = window_block_mask(q.shape[-2], self.window, q.device)
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)

    def attended_pairs(self, seq_len: int) -> int:
        full = min(self.window, seq_len)  # positions 1..full see all before them, later ones see `window`
        return full * (full + 1) // 2 + (seq_len - full) * self.window

    def kv_cache_elements(self, seq_len: int) -> int:
        return 2 * self.n_kv_heads * self.head_dim * min(self.window, seq_len)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}"
