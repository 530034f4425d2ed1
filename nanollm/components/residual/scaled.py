"""MiniMax-01's scaled residual (DeepNet-style alpha/beta): each sublayer replaces the stream h by
alpha norm(h) + beta f(norm(h)), the normed stream itself carried on, with an alpha and a beta for the mixer
and another pair for the FFN."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from .. import Param, Residual, make_norm, norm_label, register
from ...ir import ModelConfig

if TYPE_CHECKING:
    from ...compiler import Lowering, Site

FACTOR = dict(minimum=0, positional=False)


def scaled_sum(normed: torch.Tensor, out: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """alpha * normed + beta * out."""
    return alpha * normed + beta * out


@register(
    "scaled",
    "residual",
    Param("alpha", float, "factor on the normed stream after the mixer", default=1.0, **FACTOR),
    Param("beta", float, "factor on the mixer's output", default=1.0, **FACTOR),
    Param("ffn_alpha", float, "factor on the normed stream after the FFN", default=1.0, **FACTOR),
    Param("ffn_beta", float, "factor on the FFN's output", default=1.0, **FACTOR),
)
class Scaled(Residual):
    """alpha norm(h) + beta f(norm(h)): the stream is normed before every sublayer and both terms weighted."""

    formula = "each sublayer replaces the stream h by alpha norm(h) + beta f(norm(h))"

    def __init__(self, config: ModelConfig, alpha: float, beta: float, ffn_alpha: float, ffn_beta: float) -> None:
        super().__init__(config)
        self.factors = {"mixer": (alpha, beta), "ffn": (ffn_alpha, ffn_beta)}
        self.normed: dict[Site, fx.Node] = {}  # each site's norm node, which its leave reads again

    def site_modules(self, slot: str) -> dict[str, nn.Module]:
        return {"norm": make_norm(self.config, self.config.d_model)}

    def enter(self, g: Lowering, site: Site, stream: fx.Node) -> fx.Node:
        self.normed[site] = g.call(site, "norm", (stream,))
        return self.normed[site]

    def leave(self, g: Lowering, site: Site, stream: fx.Node, out: fx.Node) -> fx.Node:
        alpha, beta = self.factors[site.slot]
        return g.graph.create_node("call_function", scaled_sum, (self.normed.pop(site), out), {"alpha": alpha, "beta": beta},
                                   name=site.node("residual"))

    def picture(self, slot: str) -> tuple[list[str], list[str]]:
        return [norm_label(self.config)], []

    def hf_names(self, slot: str) -> dict[str, str]:
        return {"norm": "input_layernorm" if slot == "mixer" else "post_attention_layernorm"}
