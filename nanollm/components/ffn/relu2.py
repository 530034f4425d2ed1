"""The non-gated squared-ReLU MLP of Nemotron-H (So et al. 2021, Primer): down(relu(up(x))^2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import Component, Param, register
from ...ir import ModelConfig
from .swiglu import D_FF


@register("relu2", "ffn", D_FF, Param("bias", bool, "biases on up_proj and down_proj", default=False))
class ReLU2(Component):
    """Two-matrix MLP with a squared-ReLU activation, no gate."""

    hf_module = "mlp"

    def __init__(self, config: ModelConfig, d_ff: int, bias: bool) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, config.d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())

    def hf_weights(self) -> dict[str, str]:
        return {name: name for name, _ in self.named_parameters()}  # up_proj, down_proj, as transformers
