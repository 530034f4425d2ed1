"""Sliding-window causal attention: each query sees itself and the window-1 tokens before it."""
from __future__ import annotations

from typing import Any

import torch

from ...ir import ModelConfig
from .. import Param, register
from .causal import ATTENTION_PARAMS, SINKS, CausalAttention, attend_flex, attend_masked


@register(
    "sliding",
    "mixer",
    Param("window", int, "keys each query attends, itself included", default=4096, minimum=1, maximum=1 << 30, carry=True),
    *ATTENTION_PARAMS,
    SINKS,
)
class SlidingWindowAttention(CausalAttention):
    """Causal GQA restricted to the most recent `window` positions."""

    def __init__(self, config: ModelConfig, window: int, **attention: Any) -> None:
        super().__init__(config, **attention)
        self.window = window

    def attend_masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Reference path: SDPA with an explicit boolean window mask (trains on every device)."""
        return attend_masked(q, k, v, self.window, self.scale, self.softcap, self.sinks)

    def attend_flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Block-sparse path: flex_attention skips the blocks outside the window."""
        return attend_flex(q, k, v, self.window, self.scale, self.softcap, self.sinks)

    def attended_pairs(self, seq_len: int) -> int:
        full = min(self.window, seq_len)  # positions 1..full see all before them, later ones see `window`
        return full * (full + 1) // 2 + (seq_len - full) * self.window

    def cache_elements(self, seq_len: int) -> int:
        return 2 * self.n_kv_heads * self.head_dim * min(self.window, seq_len)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}"
