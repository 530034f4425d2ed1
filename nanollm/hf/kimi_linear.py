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


def kimi_linear_config(arch: Arch) -> Any:
    """A KimiLinearConfig of a pre-norm model of `kda` and `mla` layers with SwiGLUs and the DeepSeek-V3 MoE, or None."""
    from transformers import KimiLinearConfig

    mixer_types, ffn_types = {"kda": "linear_attention", "mla": "full_attention"}, {"swiglu": "dense", "moe": "sparse"}
    if not all(layer.residual.name == "prenorm" and layer.mixer is not None and layer.mixer.name in mixer_types and layer.ffn is not None
               and layer.ffn.name in ffn_types and len(layer.sublayers) == 2 for layer in arch.layers):
        return None
    first = {sublayer.name: sublayer.kwargs() for layer in reversed(arch.layers) for sublayer in (layer.mixer, layer.ffn)}  # each kind's first
    if "kda" not in first or "mla" not in first:
        return None
    config, mla, kda, moe = arch.config, first["mla"], first["kda"], first.get("moe")
    experts = {} if moe is None else {
        "num_local_experts": moe["experts"], "num_experts_per_tok": moe["top"], "moe_intermediate_size": moe["d_ff"], "n_shared_experts": moe["shared"],
        "norm_topk_prob": moe["norm_topk"], "routed_scaling_factor": moe["scale"], "n_group": moe["groups"], "topk_group": moe["top_groups"]}
    return KimiLinearConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=len(arch.layers), num_attention_heads=mla["heads"],
        num_key_value_heads=config.n_kv_heads, intermediate_size=first["swiglu"]["d_ff"] if "swiglu" in first else config.d_ff,
        rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings, max_position_embeddings=config.seq_len,
        kv_lora_rank=mla["kv_lora_rank"], q_lora_rank=mla["q_lora_rank"] or None, qk_nope_head_dim=mla["qk_nope_head_dim"],
        qk_rope_head_dim=mla["qk_rope_head_dim"], v_head_dim=mla["v_head_dim"], linear_num_heads=kda["heads"], linear_head_dim=kda["head_dim"],
        linear_conv_kernel_dim=kda["conv"], layer_types=[mixer_types[layer.mixer.name] for layer in arch.layers],
        mlp_layer_types=[ffn_types[layer.ffn.name] for layer in arch.layers], pad_token_id=None, bos_token_id=None, eos_token_id=None,
        **experts)


family("kimi_linear", Family(("KimiLinearForCausalLM",), kimi_linear, config_from_arch=kimi_linear_config))
