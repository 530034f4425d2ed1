"""Depthwise causal convolution over time: the short convolution of gated DeltaNet, KDA, Mamba-2, LFM2 and Engram.

One module for all of them, so each mixer's file only says how wide, how long and whether it has a bias.
The weight has nn.Conv1d's depthwise shape (channels, 1, kernel), as every transformers family stores it.
"""
from __future__ import annotations

from typing import Any

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
        # On GPUs nn.Conv1d; on CPUs the shifted sums with their backward written out (a CPU's depthwise convolution
        # takes ~3x longer forward + backward at 1280 channels, the window product ~5x: millions of 1 x K products);
        # on meta the window product, which fvcore counts (torch.jit.trace cannot run a convolution on meta in this torch).
        if x.is_cuda:
            return self.by_convolution(x)
        return self.by_windows(x) if x.is_meta else self.by_taps(x)

    def by_convolution(self, x: torch.Tensor) -> torch.Tensor:
        """nn.Conv1d over the input padded on the left (transformers pads both sides and drops the tail it computed)."""
        return super().forward(F.pad(x.transpose(1, 2), (self.span - 1, 0))).transpose(1, 2)

    def by_taps(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over taps of the weight times the input shifted by (K-1-j) dilations, one fused pass per tap."""
        return ShiftedTaps.apply(x, self.weight, self.bias, self.dilation[0])

    def by_windows(self, x: torch.Tensor) -> torch.Tensor:
        """The same products as a matmul of each output's window of taps (fvcore counts channels x kernel per token exactly;
        its einsum count is rounded)."""
        return self.over_windows(F.pad(x, (0, 0, self.span - 1, 0)))

    def over_windows(self, extended: torch.Tensor) -> torch.Tensor:
        """The outputs of the last T of (B, span - 1 + T, C) inputs: each output's window of taps times the weight."""
        windows = extended.unfold(1, self.span, 1)[..., :: self.dilation[0]]  # (B, T, C, kernel)
        out = (windows[..., None, :] @ self.weight[:, 0, :, None]).flatten(-3)
        return out + self.bias if self.bias is not None else out

    def continuing(self, pasts: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The outputs of x (B, T, C) continuing from the inputs pasts[-1] (B, at most span - 1, C), gradients flowing
        through both (a training forward in segments; `decode` keeps its state in place); appends the last span - 1 inputs."""
        extended = torch.cat([pasts[-1], x], dim=1)
        pasts.append(extended[:, max(0, extended.shape[1] - (self.span - 1)):])
        return self(extended)[:, pasts[-2].shape[1]:]

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


def shifted_taps(kernel: int, dilation: int, length: int) -> list[tuple[int, int]]:
    """(tap j, its shift (K-1-j) dilations) of the taps before the last that reach into a sequence of `length`."""
    return [(j, (kernel - 1 - j) * dilation) for j in range(kernel - 1) if (kernel - 1 - j) * dilation < length]


class ShiftedTaps(torch.autograd.Function):
    """y[t] = bias + sum_j w[j] x[t - s_j], s_j = (K-1-j) d, over (B, T, C), with the backward as shifted sums too:
    dx[t] = sum_j w[j] dy[t + s_j] and dw[j] = sum_t dy[t] x[t - s_j]; no padded copy, one buffer for the products."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
        taps, length = weight[:, 0, :].to(x.dtype), x.shape[1]
        out = x * taps[:, -1] if bias is None else torch.addcmul(bias.to(x.dtype), x, taps[:, -1])
        for j, shift in shifted_taps(taps.shape[-1], dilation, length):
            out[:, shift:].addcmul_(x[:, : length - shift], taps[:, j])
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.with_bias = dilation, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        taps, length = weight[:, 0, :].to(grad.dtype), grad.shape[1]
        grad_x = grad * taps[:, -1]
        products = grad * x  # the last tap's, in a buffer the other taps' products then reuse
        grad_weight = torch.zeros_like(weight)
        grad_weight[:, 0, -1] = products.sum((0, 1))
        for j, shift in shifted_taps(taps.shape[-1], ctx.dilation, length):
            grad_x[:, : length - shift].addcmul_(grad[:, shift:], taps[:, j])
            overlap = products[:, : length - shift]
            grad_weight[:, 0, j] = torch.mul(grad[:, shift:], x[:, : length - shift], out=overlap).sum((0, 1))
        return grad_x, grad_weight, grad.sum((0, 1)) if ctx.with_bias else None, None
