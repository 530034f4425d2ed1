"""Kimi-Linear: KDA layers and MLA layers without any rotary encoding, pre-norm, a DeepSeek-V3 MoE (sigmoid scores,
group-limited top-k, score-correction bias, routed scaling, shared experts) on the sparse layers, SwiGLU on the dense."""
from __future__ import annotations

from typing import Any

from ..ir import Arch, Call, Layer, ModelConfig
from . import Family, call, common_settings, family, refuse

LATENT_NORM_EPS = 1e-6  # transformers' KimiLinearAttention builds its latent norms with the default epsilon, not rms_norm_eps


def moe_call(hf: Any, config: ModelConfig) -> Call:
    """A Kimi-Linear sparse layer: DeepSeek-V3's routing over num_local_experts."""
    return call("moe", "ffn", config, top=hf.num_experts_per_tok, experts=hf.num_local_experts, d_ff=hf.moe_intermediate_size,
                shared=hf.n_shared_experts, router="sigmoid", norm_topk=bool(hf.norm_topk_prob), scale=float(hf.routed_scaling_factor),
                groups=hf.n_group, top_groups=hf.topk_group, balance="bias")


def kimi_linear(hf: Any) -> Arch:
    """KimiLinearForCausalLM: layer_types and mlp_layer_types place KDA or MLA, and MoE or SwiGLU, layer by layer."""
    refuse(hf.attention_bias, "the transformers config has attention_bias = true; nanollm attention has no biases")
    refuse(hf.hidden_act != "silu", f"transformers hidden_act {hf.hidden_act!r} is not supported here (only silu)")
    settings = common_settings(hf) | {"head_dim": hf.qk_nope_head_dim + hf.qk_rope_head_dim}
    config = ModelConfig(**settings, qk_norm="none", rope=Call("nope"))
    mixers = {
        "linear_attention": call("kda", "mixer", config, heads=hf.linear_num_heads, head_dim=hf.linear_head_dim,
                                 conv=hf.linear_conv_kernel_dim),
        "full_attention": call("mla", "mixer", config, kv_lora_rank=hf.kv_lora_rank, q_lora_rank=hf.q_lora_rank or 0,
                               qk_nope_head_dim=hf.qk_nope_head_dim, qk_rope_head_dim=hf.qk_rope_head_dim, v_head_dim=hf.v_head_dim,
                               latent_eps=LATENT_NORM_EPS),
    }
    ffns = {"dense": call("swiglu", "ffn", config, d_ff=hf.intermediate_size), "sparse": moe_call(hf, config)}
    for layer_type in hf.layer_types:
        refuse(layer_type not in mixers, f"Kimi-Linear layer type {layer_type!r} is not supported")
    layers = tuple(Layer((("mixer", mixers[t]), ("ffn", ffns[f])), config.residual) for t, f in zip(hf.layer_types, hf.mlp_layer_types))
    return Arch(config, layers)


family("kimi_linear", Family(("KimiLinearForCausalLM",), kimi_linear))
