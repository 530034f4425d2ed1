"""Mixtral: Llama attention without QK-norm (one window on every layer, or none) and a softmax top-k MoE."""
from __future__ import annotations

from typing import Any

from ..ir import Arch, Call, ModelConfig
from . import Family, attention_only, call, family
from .qwen3 import attention_fields, attention_layers, gqa_config, layers


def moe_call(hf: Any, config: ModelConfig) -> Call:
    """The `moe` call of a Mixtral sparse layer: softmax top-k routing, always renormalised."""
    return call("moe", "ffn", config, top=hf.num_experts_per_tok, experts=hf.num_local_experts, d_ff=hf.intermediate_size,
                aux=float(hf.router_aux_loss_coef), jitter=float(hf.router_jitter_noise))


def mixtral(hf: Any) -> Arch:
    """MixtralForCausalLM."""
    config = gqa_config(hf, "none")
    sparse = moe_call(hf, config)
    return Arch(config, layers(attention_layers(hf, config), [sparse] * hf.num_hidden_layers, config))


def mixtral_config(arch: Arch) -> Any:
    """A MixtralConfig of a model of attention layers (one window or none) with softmax MoEs, or None."""
    from transformers import MixtralConfig

    if not attention_only(arch, ("moe",)):
        return None
    moe = arch.layers[0].ffn.kwargs()
    fields = attention_fields(arch, moe["d_ff"])
    del fields["use_sliding_window"]  # Mixtral slides wherever sliding_window is set
    return MixtralConfig(**fields, num_local_experts=moe["experts"], num_experts_per_tok=moe["top"], router_aux_loss_coef=moe["aux"],
                         router_jitter_noise=moe["jitter"])


family("mixtral", Family(("MixtralForCausalLM",), mixtral, config_from_arch=mixtral_config))
