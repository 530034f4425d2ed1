"""Depthwise causal convolution over time: the short convolution of gated DeltaNet, KDA, Mamba-2, LFM2 and Engram.

One module for all of them, so each mixer's file only says how wide, how long and whether it has a bias.
The weight has nn.Conv1d's depthwise shape (channels, 1, kernel), as every transformers family stores it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import VECTOR


class CausalConv1d(nn.Conv1d):
    """y[t] = sum_j w[j] x[t - (kernel - 1 - j) * dilation] per channel, zeros before the start; (B, T, C) -> (B, T, C)."""

    def __init__(self, channels: int, kernel: int, bias: bool = False, dilation: int = 1) -> None:
        super().__init__(channels, channels, kernel, groups=channels, bias=bias, dilation=dilation)

    @property
    def span(self) -> int:
        """Past inputs (itself included) one output reads: the length of the decoding state plus one."""
        return (self.kernel_size[0] - 1) * self.dilation[0] + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Off GPUs, the product over windows: a CPU's depthwise convolution takes ~4x longer in backward, and on meta
        # torch.jit.trace (fvcore, the analysis) cannot run a convolution at all in this torch.
        return self.by_convolution(x) if x.is_cuda else self.by_windows(x)

    def by_convolution(self, x: torch.Tensor) -> torch.Tensor:
        """nn.Conv1d over the input padded on the left (transformers pads both sides and drops the tail it computed)."""
        return super().forward(F.pad(x.transpose(1, 2), (self.span - 1, 0))).transpose(1, 2)

    def by_windows(self, x: torch.Tensor) -> torch.Tensor:
        """The same products as a matmul of each output's window of taps (fvcore counts channels x kernel per token exactly;
        its einsum count is rounded)."""
        return self.over_windows(F.pad(x, (0, 0, self.span - 1, 0)))

    def over_windows(self, extended: torch.Tensor) -> torch.Tensor:
        """The outputs of the last T of (B, span - 1 + T, C) inputs: each output's window of taps times the weight."""
        windows = extended.unfold(1, self.span, 1)[..., :: self.dilation[0]]  # (B, T, C, kernel)
        out = (windows[..., None, :] @ self.weight[:, 0, :, None]).flatten(-3)
        return out + self.bias if self.bias is not None else out

    def state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """The decoding state before the first token: the last span - 1 inputs (B, span - 1, C), zeros (the padding)."""
        return torch.zeros(batch, self.span - 1, self.in_channels, device=device, dtype=dtype)

    def decode(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """The outputs of T >= 1 new inputs (B, T, C) continuing from `past` (`state`), which then holds the last span - 1 inputs."""
        extended = torch.cat([past, x.to(past.dtype)], dim=1)
        past.copy_(extended[:, extended.shape[1] - past.shape[1]:])
        return self.over_windows(extended).to(x.dtype)

    def param_roles(self) -> dict[str, str]:
        """A few taps per channel: AdamW without decay, never Muon (it is no matrix)."""
        return {name: VECTOR for name, _ in self.named_parameters(recurse=False)}
