"""Hyper-connections (Zhu et al., "Hyper-Connections", ICLR 2025): n residual streams instead of one.

The embedding is copied into n streams H (B, T, n, d). Each sublayer's site reads h_in = A_m^T H (a weighted
mix of the streams), applies the pre-norm and the sublayer, and writes H' = B^T f(norm(h_in)) + A_r^T H; the
streams are averaged before the final norm (the paper sums them: the same model, the final norm being scale-invariant,
except that a sum of n streams shrinks that norm's epsilon n^2 times; the mean leaves it as pre-norm's). Static HC
learns A_m, A_r and B per site; dynamic HC adds to them tanh(LayerNorm(H) W) * s, computed per token from the
streams. The published initialisation (A_m = e_{k mod n} for the k-th site, A_r = I, B = 1, dynamic weights 0)
makes every stream hold the pre-norm residual at step 0, so that the model computes exactly what pre-norm does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...ir import ModelConfig
from .. import MATRIX, SLOTS, VECTOR, Param, Residual, make_norm, norm_label, register

if TYPE_CHECKING:
    from ...compiler import Lowering, Site

DYNAMIC_SCALE = 0.01  # s_alpha and s_beta at initialisation, as the paper's code sets them


def expand_streams(hidden: torch.Tensor, streams: int) -> torch.Tensor:
    """(B, T, d) -> (B, T, n, d): the embedding copied into every stream."""
    return hidden.unsqueeze(-2).expand(*hidden.shape[:-1], streams, hidden.shape[-1])


def mean_streams(stream: torch.Tensor) -> torch.Tensor:
    """(B, T, n, d) -> (B, T, d): the mean of the streams, as the first one plus the mean departure from it, so that
    n equal streams give exactly that stream for any n (a plain sum of three equal values may round)."""
    first = stream[..., :1, :]
    return (first + (stream - first).sum(dim=-2, keepdim=True) / stream.shape[-2]).squeeze(-2)


def site_number(site: Site) -> int:
    """The site's index in the model's order of sublayer sites (counting every slot of every layer)."""
    return site.layer * len(SLOTS) + list(SLOTS).index(site.slot)


class WidthConnection(nn.Module):
    """One site's read: (B, T, n, d) streams -> the sublayer input A_m^T H, the mixed streams A_r^T H and the write weights B."""

    def __init__(self, streams: int, d_model: int, site: int, dynamic: bool) -> None:
        super().__init__()
        self.streams, self.site, self.dynamic = streams, site, dynamic
        self.static_alpha = nn.Parameter(torch.empty(streams, streams + 1))  # [A_m | A_r]
        self.static_beta = nn.Parameter(torch.empty(streams))  # B
        if dynamic:
            self.dynamic_alpha = nn.Parameter(torch.empty(d_model, streams + 1))
            self.dynamic_beta = nn.Parameter(torch.empty(d_model, 1))
            self.alpha_scale = nn.Parameter(torch.empty(()))
            self.beta_scale = nn.Parameter(torch.empty(()))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        alpha = torch.zeros(self.streams, self.streams + 1)
        alpha[self.site % self.streams, 0] = 1.0
        alpha[:, 1:] = torch.eye(self.streams)
        self.static_alpha.copy_(alpha)
        nn.init.ones_(self.static_beta)
        if self.dynamic:
            nn.init.zeros_(self.dynamic_alpha)
            nn.init.zeros_(self.dynamic_beta)
            nn.init.constant_(self.alpha_scale, DYNAMIC_SCALE)
            nn.init.constant_(self.beta_scale, DYNAMIC_SCALE)

    def coefficients(self, stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha (B, T, n, n+1) and beta (B, T, n): the static ones, plus the per-token ones when dynamic."""
        if not self.dynamic:  # broadcast over the tokens explicitly, so the matmuls below are counted per token
            batch = stream.shape[:-2]
            return self.static_alpha.expand(*batch, *self.static_alpha.shape), self.static_beta.expand(*batch, self.streams)
        normed = F.layer_norm(stream, stream.shape[-1:])  # per stream, no affine
        alpha = torch.tanh(normed @ self.dynamic_alpha) * self.alpha_scale + self.static_alpha
        beta = torch.tanh(normed @ self.dynamic_beta).squeeze(-1) * self.beta_scale + self.static_beta
        return alpha, beta

    def forward(self, stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        alpha, beta = self.coefficients(stream)
        mixed = alpha.transpose(-1, -2).to(stream.dtype) @ stream  # (B, T, n+1, d)
        return mixed[..., 0, :], mixed[..., 1:, :], beta

    def param_roles(self) -> dict[str, str]:
        """The dynamic projections are matrices; the static connections and scales are vectors (no decay toward 0)."""
        return {name: MATRIX if name.startswith("dynamic") else VECTOR for name, _ in self.named_parameters(recurse=False)}


class DepthConnection(nn.Module):
    """One site's write: B^T out + the mixed streams; (B, T, d), (B, T, n, d), beta -> (B, T, n, d)."""

    def forward(self, out: torch.Tensor, mixed: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return beta.unsqueeze(-1).to(out.dtype) @ out.unsqueeze(-2) + mixed


class Streams(Residual):
    """What n-stream schemes share: the embedding copied into the streams, the pending write of each open site."""

    def __init__(self, config: ModelConfig, n: int, **args: Any) -> None:
        super().__init__(config)
        self.streams = n
        self.pending: dict[Site, tuple[fx.Node, ...]] = {}  # nodes computed on entering a site that leaving it uses

    def expand(self, g: Lowering, hidden: fx.Node) -> fx.Node:
        return g.function(expand_streams, (hidden, self.streams), "streams")

    def picture(self, slot: str) -> tuple[list[str], list[str]]:
        return [f"read: mix of {self.streams} streams", norm_label(self.config)], [f"write: to {self.streams} streams"]


@register(
    "hc",
    "residual",
    Param("n", int, "residual streams (the expansion rate); 1 is the pre-norm residual", minimum=1, maximum=64),
    Param("dynamic", bool, "add per-token connection weights computed from the streams (DHC); false is static HC (SHC)", default=True),
)
class HyperConnections(Streams):
    """n streams; each sublayer reads a learned mix of them and writes its output to each with a learned weight (Zhu et al.)."""

    formula = "n streams H; each sublayer reads f(norm(A_m^T H)) and writes H = B^T f + A_r^T H; mean(H) before the final norm"

    def __init__(self, config: ModelConfig, n: int, dynamic: bool) -> None:
        super().__init__(config, n=n)
        self.dynamic = dynamic

    def site_modules(self, site: Site) -> dict[str, nn.Module]:
        return {"hc": WidthConnection(self.streams, self.config.d_model, site_number(site), self.dynamic),
                "norm": make_norm(self.config, self.config.d_model), "hc_write": DepthConnection()}

    def enter(self, g: Lowering, site: Site, stream: fx.Node) -> fx.Node:
        read = g.call(site, "hc", (stream,))
        self.pending[site] = (g.item(read, 1, site.node("hc_mixed")), g.item(read, 2, site.node("hc_beta")))
        return g.call(site, "norm", (g.item(read, 0, site.node("hc_input")),))

    def leave(self, g: Lowering, site: Site, stream: fx.Node, out: fx.Node) -> fx.Node:
        mixed, beta = self.pending.pop(site)
        return g.call(site, "hc_write", (out, mixed, beta))

    def reduce(self, g: Lowering, stream: fx.Node) -> fx.Node:
        return g.function(mean_streams, (stream,), "streams_mean")
