"""YaRN (Peng et al. 2023): RoPE extended past the context it was trained on, as transformers computes it.

Frequencies whose wavelength fits the original context many times (over `beta_fast` rotations) keep their
value; those rotating fewer than `beta_slow` times are divided by `factor`; a linear ramp blends the band in
between. The tables are multiplied by the attention factor, 0.1 ln(factor) + 1 by default, or
mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set (DeepSeek-V3).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .. import Param, register
from .rope import SHAPE, THETA, Rope


def mscale(factor: float, scale: float = 1.0) -> float:
    """YaRN's attention scale for a context extended `factor` times."""
    return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0


@register(
    "yarn",
    "position",
    Param("factor", float, "context extension factor", minimum=1e-9),
    Param("original", int, "context length the model was trained on (original_max_position_embeddings)", minimum=1),
    Param("beta_fast", float, "rotations over the original context above which a frequency is kept", default=32.0, minimum=0),
    Param("beta_slow", float, "rotations below which a frequency is divided by factor", default=1.0, minimum=0),
    Param("mscale", float, "DeepSeek's mscale (0: unset)", default=0.0, minimum=0),
    Param("mscale_all_dim", float, "DeepSeek's mscale_all_dim (0: unset)", default=0.0, minimum=0),
    Param("attention_factor", float, "factor on the tables (0: from factor and the mscales)", default=0.0, minimum=0),
    Param("truncate", bool, "round the ramp's ends to whole dimensions", default=True),
    THETA,
    *SHAPE,
)
class Yarn(Rope):
    """RoPE with YaRN context extension."""

    def __init__(self, head_dim: int, factor: float, original: int, beta_fast: float, beta_slow: float, mscale: float,
                 mscale_all_dim: float, attention_factor: float, truncate: bool, **common: Any) -> None:
        super().__init__(head_dim, factor=factor, **common)
        self.original, self.beta_fast, self.beta_slow, self.truncate = original, beta_fast, beta_slow, truncate
        self.mscale, self.mscale_all_dim, self.attention_factor = mscale, mscale_all_dim, attention_factor

    @classmethod
    def problem(cls, head_dim: int, **args: Any) -> str | None:
        if args["placement"] == "proportional":
            return "placement=proportional is not defined for YaRN"
        return super().problem(head_dim, **args)

    def frequencies(self) -> tuple[torch.Tensor, float]:
        width = self.span.stop - self.span.start

        def correction(rotations: float) -> float:  # the dimension whose wavelength fits `rotations` times
            return width * math.log(self.original / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low, high = correction(self.beta_fast), correction(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, width - 1)
        if low == high:
            high += 0.001  # no zero-width ramp
        ramp = ((torch.arange(width // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        powers = self.theta ** (torch.arange(0, width, 2, dtype=torch.int64).float() / width)
        extrapolation, interpolation = 1.0 / powers, 1.0 / (self.factor * powers)
        kept = 1 - ramp  # the share of each frequency left as it was
        inv_freq = interpolation * (1 - kept) + extrapolation * kept
        if self.attention_factor:
            factor = self.attention_factor
        elif self.mscale and self.mscale_all_dim:
            factor = mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim)
        else:
            factor = mscale(self.factor)
        return inv_freq, factor
