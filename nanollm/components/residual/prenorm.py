"""The pre-norm residual (GPT-2, Llama, Qwen3): each sublayer adds f(norm(h)) to the stream h."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx, nn

from .. import Residual, make_norm, norm_label, register

if TYPE_CHECKING:
    from ...compiler import Lowering, Site


HF_NORMS = {"mixer": "input_layernorm", "ffn": "post_attention_layernorm"}  # transformers' names of the sites' norms


@register("prenorm", "residual")
class PreNorm(Residual):
    """h + f(norm(h)): the norm before each sublayer, the stream itself never normalised."""

    formula = "each sublayer adds f(norm(h)) to the stream h"

    def site_modules(self, site: Site) -> dict[str, nn.Module]:
        return {"norm": make_norm(self.config, self.config.d_model)}

    def enter(self, g: Lowering, site: Site, stream: fx.Node) -> fx.Node:
        return g.call(site, "norm", (stream,))

    def leave(self, g: Lowering, site: Site, stream: fx.Node, out: fx.Node) -> fx.Node:
        return g.add(stream, out, site.node("residual"))

    def picture(self, slot: str) -> tuple[list[str], list[str]]:
        return [norm_label(self.config)], []

    def hf_names(self, slot: str) -> dict[str, str]:
        return {"norm": HF_NORMS[slot]} if slot in HF_NORMS else {}
