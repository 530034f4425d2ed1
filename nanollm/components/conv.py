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
        windows = F.pad(x, (0, 0, self.span - 1, 0)).unfold(1, self.span, 1)[..., :: self.dilation[0]]  # (B, T, C, kernel)
        out = (windows[..., None, :] @ self.weight[:, 0, :, None]).flatten(-3)
        return out + self.bias if self.bias is not None else out

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: x (B, C) and the previous span-1 inputs (B, C, span-1) -> output (B, C) and the next state."""
        window = torch.cat([state, x[..., None]], dim=-1)
        out = (window[..., :: self.dilation[0]] * self.weight[:, 0]).sum(-1)
        return (out + self.bias if self.bias is not None else out), window[..., 1:]

    def param_roles(self) -> dict[str, str]:
        """A few taps per channel: AdamW without decay, never Muon (it is no matrix)."""
        return {name: VECTOR for name, _ in self.named_parameters(recurse=False)}
