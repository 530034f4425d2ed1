"""Gated feed-forward layers (Shazeer 2020): SwiGLU, down(silu(gate(x)) * up(x)), and GeGLU with tanh-GELU (Gemma)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import Component, Param, register
from ...ir import ModelConfig

D_FF = Param("d_ff", int, "hidden width", setting="d_ff", minimum=1, width=True)


@register("swiglu", "ffn", D_FF)
class SwiGLU(Component):
    """Gated SiLU MLP without biases."""

    hf_module = "mlp"

    def __init__(self, config: ModelConfig, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, config.d_model, bias=False)

    def activation(self, gate: torch.Tensor) -> torch.Tensor:
        return F.silu(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))

    def hf_weights(self) -> dict[str, str]:
        return {name: name for name, _ in self.named_parameters()}  # gate_proj, up_proj, down_proj, as transformers


@register("geglu", "ffn", D_FF)
class GeGLU(SwiGLU):
    """Gated tanh-GELU MLP without biases (Gemma's gelu_pytorch_tanh)."""

    def activation(self, gate: torch.Tensor) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh")
