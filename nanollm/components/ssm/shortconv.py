"""LFM2's gated short convolution (Liquid AI): in_proj(x) -> B, C, x; y = C * conv(B * x); out_proj(y).

A depthwise causal convolution of a few taps between two multiplicative gates, no activation: its state is the
last kernel-1 gated inputs per channel. Its "chunked" form is the convolution over the whole sequence, its
decoding form `CausalConv1d.decode`, its reference `naive` below.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ...ir import ModelConfig
from .. import Component, Param, register
from ..conv import CausalConv1d
from . import segment_length


def naive(gated: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y[t, c] = bias[c] + sum_j weight[c, 0, j] gated[t - (K-1) + j, c], the sum written out tap by tap; for tests."""
    kernel, length = weight.shape[-1], gated.shape[1]
    out = torch.zeros_like(gated) if bias is None else bias.expand_as(gated).clone()
    for j in range(kernel):
        shift = kernel - 1 - j
        out[:, shift:] += weight[:, 0, j] * gated[:, : length - shift]
    return out


@register(
    "shortconv",
    "mixer",
    Param("kernel", int, "taps of the causal convolution (LFM2: conv_L_cache)", default=3, minimum=1, maximum=1 << 10),
    Param("bias", bool, "biases on in_proj, the convolution and out_proj", default=False),
)
class ShortConv(Component):
    """Gated depthwise causal convolution: C * conv(B * x)."""

    hf_module = "conv"
    fixed_state = True

    def __init__(self, config: ModelConfig, kernel: int, bias: bool) -> None:
        super().__init__()
        d = config.d_model
        self.in_proj = nn.Linear(d, 3 * d, bias=bias)
        self.conv = CausalConv1d(d, kernel, bias=bias)
        self.out_proj = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        span = segment_length(x, self.in_proj.out_features)
        if x.shape[1] <= span or x.is_meta:  # on meta (the analysis) one pass: the same products, a shorter trace
            return self.mix(x, self.conv)
        pasts = [x.new_zeros(x.shape[0], 0, self.conv.in_channels)]  # segments (LAYER_SEGMENT_BYTES), the conv's inputs carried
        return torch.cat([self.mix(x[:, start:start + span], functools.partial(self.conv.continuing, pasts))
                          for start in range(0, x.shape[1], span)], dim=1)

    def mix(self, x: torch.Tensor, convolve: Any) -> torch.Tensor:
        """out_proj(C * convolve(B * x)) of x (B, T, d_model)."""
        b, c, x = self.in_proj(x).chunk(3, dim=-1)
        return self.out_proj(c * convolve(b * x))

    def state(self, batch: int, capacity: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The convolution's last kernel - 1 gated inputs, whatever the capacity."""
        return {"conv": self.conv.state(batch, device, dtype)}

    def decode(self, state: dict[str, torch.Tensor], start: int, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x, functools.partial(self.conv.decode, past=state["conv"]))

    def cache_elements(self, seq_len: int) -> int:
        return self.conv.in_channels * (self.conv.span - 1)

    def hf_weights(self) -> dict[str, str]:
        return {name: name for name, _ in self.named_parameters()}  # in_proj, conv, out_proj, as transformers

    def extra_repr(self) -> str:
        return f"kernel={self.conv.kernel_size[0]}"
