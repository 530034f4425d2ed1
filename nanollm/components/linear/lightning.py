"""Lightning attention (MiniMax-01, Qin et al. 2024): linear attention with a fixed exponential decay per head.

q, k, v = SiLU(qkv_proj(x)) split per head ([q | k | v] within each head, as MiniMax stores it); no softmax, no
1/sqrt(d), no position encoding. Each head h decays its state by exp(-s_h) per token, s_h = 2^(-8(h+1)/H) times
the layer's `decay` factor (MiniMax: 1 - l/(L-1), so the first layer forgets fastest and the last barely).
The attention output is RMS-normed over all heads, gated by sigmoid(output_gate(x)) and projected back.
The core is `scalar_decay`'s recurrence with g = -s_h: chunked for training and prefill, one `step` per decoded token.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...ir import MAX_WIDTH, Call, ModelConfig
from .. import Component, Param, register, telling
from ..norm.rmsnorm import RMSNorm
from . import scalar_decay

OUTPUT_NORM_EPS = 1e-6  # MiniMax's norm over the heads keeps RMSNorm's default, whatever the model's norm_eps
CHUNK = Param("chunk", int, "tokens per block of the chunked (training) form", default=256, minimum=1, maximum=1 << 16)


@register(
    "lightning",
    "mixer",
    Param("heads", int, "heads", setting="n_heads", minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("head_dim", int, "width of one head (keys and values)", setting="head_dim", minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("decay", float, "factor on the per-head decay rates 2^(-8(h+1)/H); MiniMax: 1 - layer/(layers-1)", default=1.0, minimum=0),
    CHUNK,
)
class LightningAttention(Component):
    """Linear attention with per-head exponential decay, SiLU features, a normed and gated output."""

    hf_module = "self_attn"
    fixed_state = True

    def __init__(self, config: ModelConfig, heads: int, head_dim: int, decay: float, chunk: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.decay, self.chunk = heads, head_dim, decay, chunk
        width = heads * head_dim
        self.qkv_proj = nn.Linear(config.d_model, 3 * width, bias=False)
        self.output_gate = nn.Linear(config.d_model, width, bias=False)
        self.norm = RMSNorm(width, OUTPUT_NORM_EPS)
        self.out_proj = nn.Linear(width, config.d_model, bias=False)

    @classmethod
    def describe(cls, call: Call, config: ModelConfig) -> list[str]:
        args, shown = call.kwargs(), telling(call, config, always=("chunk",))
        return [shown, f"{args['heads']} heads, head_dim {args['head_dim']}, state {args['head_dim']}x{args['head_dim']} per head"]

    def slopes(self, device: torch.device) -> torch.Tensor:
        """s_h per head (H,), computed as MiniMax does (fp32 powers of 2^(-8/H), times the layer's factor)."""
        base = 1 / (2 ** (8 / self.heads))
        return base ** (torch.arange(self.heads, device=device) + 1) * self.decay

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, H, T, d) of x (B, T, d_model)."""
        qkv = F.silu(self.qkv_proj(x)).view(*x.shape[:-1], self.heads, 3 * self.head_dim)
        return tuple(t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))

    def output(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """out_proj(norm(attended) * sigmoid(output_gate(x))) of the heads' outputs (B, T, H * d)."""
        return self.out_proj(self.norm(attended) * torch.sigmoid(self.output_gate(x)))

    def forward(self, x: torch.Tensor, form: Any = scalar_decay.chunked) -> torch.Tensor:
        return self.attend(x, form, None)[0]

    def attend(self, x: torch.Tensor, form: Any, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixer's output over x (B, T, d_model) with the recurrence in `form`, from `state` (None: zeros), and the final state."""
        q, k, v = self.features(x)
        g = (-self.slopes(x.device))[None, :, None].expand(x.shape[0], -1, x.shape[1])
        attended, final = form(q, k, v, g, self.chunk, state)
        return self.output(x, attended.transpose(1, 2).reshape(*x.shape[:-1], -1)), final

    def state(self, batch: int, capacity: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """One (d, d) state per head, whatever the capacity."""
        return {"recurrent": torch.zeros(batch, self.heads, self.head_dim, self.head_dim, device=device, dtype=dtype)}

    def decode(self, state: dict[str, torch.Tensor], start: int, x: torch.Tensor) -> torch.Tensor:
        # a prefill chunk in the chunked form from the carried state, a single token by the recurrence
        out, final = self.attend(x, scalar_decay.chunked if x.shape[1] > 1 else scalar_decay.recurrent, state["recurrent"])
        state["recurrent"].copy_(final)
        return out

    def cache_elements(self, seq_len: int) -> int:
        return self.heads * self.head_dim * self.head_dim  # one (d, d) state per head, whatever the length

    def hf_weights(self) -> dict[str, str]:
        return {name: name for name, _ in self.named_parameters()}  # qkv_proj, output_gate, norm, out_proj, as transformers

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, decay={self.decay:g}, chunk={self.chunk}"
