"""RMSNorm (Zhang & Sennrich 2019): x / rms(x) * weight, computed in fp32; or Gemma's zero-centred x / rms(x) * (1 + w)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import Param, Registered, register
from ...ir import Call


@register(
    "rmsnorm",
    "norm",
    Param("zero_centered", bool, "learn w in a scale of 1 + w, w starting at 0 (Gemma, Qwen3-Next)", default=False),
)
class RMSNorm(Registered, nn.Module):
    """Root-mean-square norm over the last dimension with a learned scale."""

    def __init__(self, dim: int, eps: float, zero_centered: bool = False) -> None:
        super().__init__()
        self.eps, self.zero_centered = eps, zero_centered
        self.weight = nn.Parameter(torch.empty(dim))

    @classmethod
    def label(cls, call: Call) -> str:
        """The norm's name in diagrams."""
        return "RMSNorm (1 + w)" if call.kwargs()["zero_centered"] else "RMSNorm"

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.zero_centered else nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.zero_centered:  # Gemma scales in fp32, then casts
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        # Normalise in fp32 and scale in the input dtype, as Qwen3/Llama do, so bf16 runs match them.
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", zero_centered" if self.zero_centered else "")

