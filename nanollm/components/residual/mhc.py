"""Manifold-constrained hyper-connections (DeepSeek, "mHC", arXiv 2512.24880; DeepSeek-V4), as transformers'
`DeepseekV4HyperConnection` computes them.

n streams x (B, T, n, d). Per site, from the flattened streams normalised (RMSNorm without weight, over n d):
[pre~, post~, res~] = (x' phi) * [a_pre, a_post, a_res] + b, then pre = sigmoid(pre~) + eps (bounded in (0, 1]),
post = 2 sigmoid(post~) (bounded in (0, 2)), res = Sinkhorn(softmax(res~) + eps): a doubly stochastic n x n matrix,
so a product of them over any depth has spectral norm 1 and the streams cannot blow up. The sublayer reads
norm(pre^T H) and the site writes H = post f + res^T H. A learned head (sigmoid weights) sums the streams at the end.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...ir import ModelConfig
from .. import INIT_STD, MATRIX, VECTOR, Param, make_norm, register
from .hc import Streams
from .prenorm import HF_NORMS

if TYPE_CHECKING:
    from ...compiler import Lowering, Site


HF_HYPER_CONNECTIONS = {"mixer": "attn_hc", "ffn": "ffn_hc"}  # transformers' (DeepSeek-V4's) names of the sites' connections


def sinkhorn(matrix: torch.Tensor, iterations: int, eps: float) -> torch.Tensor:
    """Alternate column and row normalisation of a positive matrix (last two dims): a doubly stochastic one.

    Columns first and last, `iterations` column normalisations in all, each sum padded by `eps` (as transformers does).
    """
    matrix = matrix / (matrix.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iterations - 1):
        matrix = matrix / (matrix.sum(dim=-1, keepdim=True) + eps)
        matrix = matrix / (matrix.sum(dim=-2, keepdim=True) + eps)
    return matrix


def weighted_streams(weights: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    """sum_i weights_i H_i: fp32 weights (B, T, n), streams (B, T, n, d) -> (B, T, d), summed in fp32 (as transformers does)
    and returned in the streams' dtype."""
    return (weights.unsqueeze(-2) @ stream.float()).squeeze(-2).to(stream.dtype)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dimension, without a learned scale."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class ManifoldConnection(nn.Module):
    """One site's read: streams (B, T, n, d) -> the sublayer input pre^T H, and post (B, T, n) and res (B, T, n, n) for the write."""

    def __init__(self, streams: int, d_model: int, sinkhorn_iterations: int, eps: float, norm_eps: float) -> None:
        super().__init__()
        self.streams, self.iterations, self.eps, self.norm_eps = streams, sinkhorn_iterations, eps, norm_eps
        self.fn = nn.Parameter(torch.empty((2 + streams) * streams, streams * d_model))  # phi: [pre | post | res] rows
        self.base = nn.Parameter(torch.empty((2 + streams) * streams))  # b
        self.scale = nn.Parameter(torch.empty(3))  # a_pre, a_post, a_res

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.fn, std=INIT_STD)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)

    def maps(self, stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre (B, T, n), post (B, T, n) and the doubly stochastic res (B, T, n, n), in fp32."""
        n = self.streams
        flat = unweighted_rms_norm(stream.flatten(-2).float(), self.norm_eps)
        pre, post, res = F.linear(flat, self.fn.float()).split([n, n, n * n], dim=-1)
        pre_b, post_b, res_b = self.base.float().split([n, n, n * n])
        pre_a, post_a, res_a = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre * pre_a + pre_b) + self.eps
        post = 2 * torch.sigmoid(post * post_a + post_b)
        res = torch.softmax(res.unflatten(-1, (n, n)) * res_a + res_b.view(n, n), dim=-1) + self.eps
        return pre, post, sinkhorn(res, self.iterations, self.eps)

    def forward(self, stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre, post, res = self.maps(stream)
        return weighted_streams(pre, stream), post, res

    def param_roles(self) -> dict[str, str]:
        """phi is a matrix; the biases and gating factors are vectors (AdamW, as DeepSeek-V4 trains them)."""
        return {"fn": MATRIX, "base": VECTOR, "scale": VECTOR}


class ManifoldWrite(nn.Module):
    """One site's write: post f + res^T H; (B, T, d), (B, T, n, d), post, res -> (B, T, n, d)."""

    def forward(self, out: torch.Tensor, stream: torch.Tensor, post: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        dtype = stream.dtype
        return post.unsqueeze(-1).to(dtype) @ out.unsqueeze(-2) + res.transpose(-1, -2).to(dtype) @ stream


class StreamHead(nn.Module):
    """The streams summed with learned positive weights sigmoid(x' phi s + b) + eps before the final norm (DeepSeek-V4's HyperHead)."""

    def __init__(self, streams: int, d_model: int, eps: float, norm_eps: float) -> None:
        super().__init__()
        self.eps, self.norm_eps = eps, norm_eps
        self.fn = nn.Parameter(torch.empty(streams, streams * d_model))
        self.base = nn.Parameter(torch.empty(streams))
        self.scale = nn.Parameter(torch.empty(1))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.fn, std=INIT_STD)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)

    def forward(self, stream: torch.Tensor) -> torch.Tensor:
        flat = unweighted_rms_norm(stream.flatten(-2).float(), self.norm_eps)
        weights = torch.sigmoid(F.linear(flat, self.fn.float()) * self.scale.float() + self.base.float()) + self.eps
        return weighted_streams(weights, stream)

    def param_roles(self) -> dict[str, str]:
        return {"fn": MATRIX, "base": VECTOR, "scale": VECTOR}


@register(
    "mhc",
    "residual",
    Param("n", int, "residual streams", minimum=1, maximum=64),
    Param("sinkhorn", int, "Sinkhorn-Knopp iterations projecting the stream mixing onto doubly stochastic matrices", default=20, minimum=1),
    Param("eps", float, "added to pre and to the mixing before Sinkhorn, and to each of its sums", default=1e-6, minimum=0,
          positional=False),
)
class ManifoldHyperConnections(Streams):
    """n streams mixed by doubly stochastic matrices (Sinkhorn), bounded read and write weights (DeepSeek's mHC)."""

    formula = "n streams H; each sublayer reads f(norm(pre^T H)) and writes H = post f + res^T H, res doubly stochastic"

    def __init__(self, config: ModelConfig, n: int, sinkhorn: int, eps: float) -> None:
        super().__init__(config, n=n)
        self.iterations, self.eps = sinkhorn, eps

    def site_modules(self, site: Site) -> dict[str, nn.Module]:
        d, eps = self.config.d_model, self.config.norm_eps
        return {"hc": ManifoldConnection(self.streams, d, self.iterations, self.eps, eps),
                "norm": make_norm(self.config, d), "hc_write": ManifoldWrite()}

    def model_modules(self) -> dict[str, nn.Module]:
        return {"hc_head": StreamHead(self.streams, self.config.d_model, self.eps, self.config.norm_eps)}

    def enter(self, g: Lowering, site: Site, stream: fx.Node) -> fx.Node:
        read = g.call(site, "hc", (stream,))
        self.pending[site] = (g.item(read, 1, site.node("hc_post")), g.item(read, 2, site.node("hc_res")))
        return g.call(site, "norm", (g.item(read, 0, site.node("hc_input")),))

    def leave(self, g: Lowering, site: Site, stream: fx.Node, out: fx.Node) -> fx.Node:
        post, res = self.pending.pop(site)
        return g.call(site, "hc_write", (out, stream, post, res))

    def reduce(self, g: Lowering, stream: fx.Node) -> fx.Node:
        return g.module("hc_head", (stream,), "hc_head")

    def hf_names(self, slot: str) -> dict[str, str]:
        """DeepSeek-V4's names: the mixer's connection `attn_hc`, the FFN's `ffn_hc`, the norms as pre-norm's."""
        return {"hc": HF_HYPER_CONNECTIONS[slot], "norm": HF_NORMS[slot]} if slot in HF_NORMS else {}

    def hf_model_names(self) -> dict[str, str]:
        return {f"hc_head.{name}": f"hc_head.hc_{name}" for name in ("fn", "base", "scale")}
