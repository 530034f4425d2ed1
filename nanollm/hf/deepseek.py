"""DeepSeek-V3: its MoE layer maps onto `moe`; its attention (MLA) has no nanollm counterpart yet, so models are refused."""
from __future__ import annotations

from typing import Any

from ..errors import ArchError
from ..ir import Arch, Call, ModelConfig
from . import Family, call, family


def moe_call(hf: Any, config: ModelConfig) -> Call:
    """The `moe` call of a DeepSeek-V3 sparse layer: sigmoid scores, group-limited top-k, score-correction bias, shared experts."""
    return call("moe", "ffn", config, top=hf.num_experts_per_tok, experts=hf.n_routed_experts, d_ff=hf.moe_intermediate_size,
                shared=hf.n_shared_experts, router="sigmoid", norm_topk=bool(hf.norm_topk_prob), scale=float(hf.routed_scaling_factor),
                groups=hf.n_group, top_groups=hf.topk_group, balance="bias")


def deepseek_v3(hf: Any) -> Arch:
    """Refused: DeepSeek-V3's attention is multi-head latent attention."""
    raise ArchError("transformers DeepseekV3 uses multi-head latent attention (MLA), which nanollm does not have yet")


family("deepseek_v3", Family(("DeepseekV3ForCausalLM",), deepseek_v3))
