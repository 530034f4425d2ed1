"""Rotary position embedding (Su et al. 2021), half-split layout as in Llama/Qwen3."""
from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Computes the cos/sin tables for positions 0..T-1 of a batch of token ids."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Recomputed from constants on each call: no buffer to lose when a meta model is materialised.
        # The 64-entry frequency table is made on the CPU: scalar division on meta goes through torch._refs,
        # whose first use imports torch._dynamo (~2 s) and would dominate static analysis.
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        inv_freq = (1.0 / (self.theta**exponent)).to(input_ids.device)
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device).float()
        freqs = positions[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (B, H, T, head_dim) by the position tables of shape (T, head_dim)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
