"""Mixtral: Llama attention without QK-norm (one window on every layer, or none) and a softmax top-k MoE."""
from __future__ import annotations

from typing import Any

from ..ir import Arch, Call, ModelConfig
from . import Family, call, family
from .qwen3 import attention_layers, gqa_config, layers


def moe_call(hf: Any, config: ModelConfig) -> Call:
    """The `moe` call of a Mixtral sparse layer: softmax top-k routing, always renormalised."""
    return call("moe", "ffn", config, top=hf.num_experts_per_tok, experts=hf.num_local_experts, d_ff=hf.intermediate_size,
                aux=float(hf.router_aux_loss_coef), jitter=float(hf.router_jitter_noise))


def mixtral(hf: Any) -> Arch:
    """MixtralForCausalLM."""
    config = gqa_config(hf, "none")
    sparse = moe_call(hf, config)
    return Arch(config, layers(attention_layers(hf, config), [sparse] * hf.num_hidden_layers, config))


family("mixtral", Family(("MixtralForCausalLM",), mixtral))
