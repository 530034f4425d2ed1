"""SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import Component, Param, register
from ...ir import ModelConfig


@register("swiglu", "ffn", Param("d_ff", int, "hidden width", default="d_ff", minimum=1, width=True))
class SwiGLU(Component):
    """Gated SiLU MLP without biases."""

    def __init__(self, config: ModelConfig, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
