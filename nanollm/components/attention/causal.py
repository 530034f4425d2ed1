"""Causal grouped-query attention over the whole prefix (`global`); MHA when n_kv_heads == n_heads."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from fvcore.nn.jit_handles import get_shape
from torch import nn

from .. import Component, register
from ...ir import ModelConfig
from ..norm.rmsnorm import RMSNorm
from ..position.rope import apply_rope


def sdpa_handle(attended_pairs: int) -> Callable:
    """fvcore handle for scaled_dot_product_attention counting only the (query, key) pairs really attended."""

    def count(inputs: list, outputs: list) -> int:
        q, v = get_shape(inputs[0]), get_shape(inputs[2])
        batch, heads = q[0], q[1]
        return batch * heads * attended_pairs * (q[-1] + v[-1])  # QK^T and AV multiply-accumulates

    return count


@register("global", "mixer")
class CausalAttention(Component):
    """Causal GQA with QK-norm and RoPE on scaled_dot_product_attention."""

    uses_rope = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        d, q_width, kv_width = config.d_model, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(d, q_width, bias=False)
        self.k_proj = nn.Linear(d, kv_width, bias=False)
        self.v_proj = nn.Linear(d, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, d, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, length, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        out = self.attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention core on (B, H, T, head_dim) tensors."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def attended_pairs(self, seq_len: int) -> int:
        """(query, key) pairs one head scores over a sequence: each position sees itself and all before it."""
        return seq_len * (seq_len + 1) // 2

    def kv_cache_elements(self, seq_len: int) -> int:
        return 2 * self.n_kv_heads * self.head_dim * seq_len

    def flop_handles(self, seq_len: int) -> dict[str, Callable]:
        return {"aten::scaled_dot_product_attention": sdpa_handle(self.attended_pairs(seq_len))}

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}"
