"""Rotary position embedding (Su et al. 2021) and no position encoding at all (`nope`).

A position encoding is a module computing the cos/sin tables of the positions for heads of one width (the
model holds one per distinct encoding and width, shared by every layer using it); the attention that declared
it applies the tables to its queries and keys with `rotate`. Variants, all as transformers computes them:
linear scaling (positions divided by `factor`), partial rotation of the first or the last dimensions of a
head, Gemma 4's proportional rotation (frequencies over the whole head, zero past a fraction of it), and
interleaved pairs (2i, 2i+1) beside Llama's half-split pairs (i, i + d/2). YaRN is in yarn.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import Param, Registered, register

PLACEMENTS = ("first", "last", "proportional")


@dataclass(frozen=True)
class Layout:
    """Which dimensions of a head rotate ([start, stop)) and how they pair."""

    start: int
    stop: int
    interleaved: bool


THETA = Param("theta", float, "base frequency (default: the rope_theta setting)", setting="rope_theta", minimum=1)
SHAPE = (  # which dimensions rotate, and how they pair
    Param("fraction", float, "share of each head's dimensions that rotate", default=1.0, minimum=0, maximum=1),
    Param("placement", str, "which dimensions rotate: the first, the last, or proportional (Gemma 4: frequencies "
                            "over the whole head, zero past the fraction)", default="first", choices=PLACEMENTS),
    Param("interleaved", bool, "pairs (2i, 2i+1) instead of (i, i + d/2)", default=False),
)


class Position(Registered, nn.Module):
    """Base class of position encodings: a module computing cos/sin tables for heads of `head_dim`."""

    def __init__(self, head_dim: int, **args: Any) -> None:
        super().__init__()
        self.head_dim = head_dim

    @classmethod
    def layout(cls, head_dim: int, **args: Any) -> Layout | None:
        """The rotated dimensions of a head of this width (None: nothing rotates, there are no tables)."""
        return None

    @classmethod
    def problem(cls, head_dim: int, **args: Any) -> str | None:
        """A message if the encoding cannot apply to heads of this width, else None."""
        return None


@register("rope", "position", THETA, Param("factor", float, "linear scaling: positions divided by factor", default=1.0, minimum=1e-9),
          *SHAPE)
class Rope(Position):
    """Rotary position embedding with linear scaling, partial and interleaved variants."""

    def __init__(self, head_dim: int, theta: float, factor: float, fraction: float, placement: str, interleaved: bool) -> None:
        super().__init__(head_dim)
        self.theta, self.factor, self.fraction, self.placement, self.interleaved = theta, factor, fraction, placement, interleaved
        self.span = self.layout(head_dim, fraction=fraction, placement=placement, interleaved=interleaved)

    @classmethod
    def layout(cls, head_dim: int, **args: Any) -> Layout:
        if args["placement"] == "proportional":
            return Layout(0, head_dim, args["interleaved"])
        width = int(head_dim * args["fraction"])
        start = head_dim - width if args["placement"] == "last" else 0
        return Layout(start, start + width, args["interleaved"])

    @classmethod
    def problem(cls, head_dim: int, **args: Any) -> str | None:
        layout = cls.layout(head_dim, **args)
        width = layout.stop - layout.start
        if width < 2 or width % 2:
            return f"{args['fraction']:g} of head_dim {head_dim} rotates {width} dimensions: RoPE needs an even number, at least 2"
        return None

    def rotated_pairs(self) -> int:
        """How many (dimension, dimension) pairs carry a frequency."""
        return int(self.fraction * self.head_dim // 2) if self.placement == "proportional" else (self.span.stop - self.span.start) // 2

    def frequencies(self) -> tuple[torch.Tensor, float]:
        """The inverse frequency of each rotated pair (fp32, CPU) and the factor the tables are multiplied by."""
        # The exponent's denominator is the rotated width, or for proportional rotation the whole head.
        width = self.head_dim if self.placement == "proportional" else self.span.stop - self.span.start
        pairs = self.rotated_pairs()
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, 2 * pairs, 2, dtype=torch.int64).float() / width)) / self.factor
        padding = (self.span.stop - self.span.start) // 2 - pairs  # proportional: the pairs past the fraction stay put
        return torch.cat((inv_freq, torch.zeros(padding))), 1.0

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, fp32, of shape (T, rotated dimensions), for positions of shape (T,)."""
        width = self.span.stop - self.span.start
        if positions.is_meta:  # the analysis needs shapes only: no table whose size follows head_dim
            return (positions.new_empty((positions.shape[-1], width), dtype=torch.float32),) * 2
        # The frequency table is made on the CPU: scalar division on meta goes through torch._refs, whose
        # first use imports torch._dynamo (~2 s). Recomputed on each call: no buffer to lose when materialising.
        inv_freq, factor = self.frequencies()
        freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
        angles = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((freqs, freqs), dim=-1)
        return angles.cos() * factor, angles.sin() * factor

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


@register("nope", "position")
class NoPE(Position):
    """No position encoding: attention sees positions only through the causal mask."""


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Rotate x of shape (B, H, T, head_dim) by tables of shape (T, rotated dimensions), in the layout's dimensions."""
    if layout.start or layout.stop != x.shape[-1]:
        before, middle, after = x[..., :layout.start], x[..., layout.start:layout.stop], x[..., layout.stop:]
        return torch.cat((before, rotate(middle, cos, sin, Layout(0, middle.shape[-1], layout.interleaved)), after), dim=-1)
    if layout.interleaved:
        rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    else:
        first, second = x.chunk(2, dim=-1)
        rotated = torch.cat((-second, first), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
