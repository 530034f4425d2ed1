"""The post-norm residual of OLMo 2 and 3 ("reordered norm"): each sublayer adds norm(f(h)) to the stream h."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx, nn

from .. import Residual, make_norm, norm_label, register

if TYPE_CHECKING:
    from ...compiler import Lowering, Site


@register("postnorm", "residual")
class PostNorm(Residual):
    """h + norm(f(h)): the sublayer reads the stream as it is and its output is normalised before the add."""

    formula = "each sublayer adds norm(f(h)) to the stream h"

    def site_modules(self, site: Site) -> dict[str, nn.Module]:
        return {"post_norm": make_norm(self.config, self.config.d_model)}

    def enter(self, g: Lowering, site: Site, stream: fx.Node) -> fx.Node:
        return stream

    def leave(self, g: Lowering, site: Site, stream: fx.Node, out: fx.Node) -> fx.Node:
        return g.add(stream, g.call(site, "post_norm", (out,)), site.node("residual"))

    def picture(self, slot: str) -> tuple[list[str], list[str]]:
        return [], [norm_label(self.config)]

    def hf_names(self, slot: str) -> dict[str, str]:
        return {"post_norm": "post_attention_layernorm" if slot == "mixer" else "post_feedforward_layernorm"}
