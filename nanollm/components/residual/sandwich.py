"""The sandwich residual of Gemma 2 and 3: each sublayer adds norm(f(norm(h))) to the stream h."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx, nn

from .. import Residual, make_norm, norm_label, register

if TYPE_CHECKING:
    from ...compiler import Lowering, Site

HF_NAMES = {  # transformers' Gemma names: the FFN's pre-norm is not its post_attention_layernorm here
    "mixer": {"norm": "input_layernorm", "post_norm": "post_attention_layernorm"},
    "ffn": {"norm": "pre_feedforward_layernorm", "post_norm": "post_feedforward_layernorm"},
}


@register("sandwich", "residual")
class Sandwich(Residual):
    """h + norm(f(norm(h))): a norm before and a norm after every sublayer."""

    formula = "each sublayer adds norm(f(norm(h))) to the stream h"

    def site_modules(self, site: Site) -> dict[str, nn.Module]:
        return {"norm": make_norm(self.config, self.config.d_model), "post_norm": make_norm(self.config, self.config.d_model)}

    def enter(self, g: Lowering, site: Site, stream: fx.Node) -> fx.Node:
        return g.call(site, "norm", (stream,))

    def leave(self, g: Lowering, site: Site, stream: fx.Node, out: fx.Node) -> fx.Node:
        return g.add(stream, g.call(site, "post_norm", (out,)), site.node("residual"))

    def picture(self, slot: str) -> tuple[list[str], list[str]]:
        return [norm_label(self.config)], [norm_label(self.config)]

    def hf_names(self, slot: str) -> dict[str, str]:
        return HF_NAMES.get(slot, {})
