"""DeepSeek-V3 and V3.2: multi-head latent attention on every layer (`mla`; V3.2's with its lightning indexer, `dsa`),
`first_k_dense_replace` dense SwiGLU layers, then the MoE (sigmoid scores, group-limited top-k, score-correction bias,
shared experts)."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..ir import Arch, Call, Layer, ModelConfig
from . import Family, call, common_settings, family, refuse, rope_call, rope_parameters

LATENT_NORM_EPS = 1e-6  # transformers norms DeepSeek's query and key/value latents at this eps, whatever rms_norm_eps says


def moe_call(hf: Any, config: ModelConfig, **overrides: Any) -> Call:
    """The `moe` call of a DeepSeek-V3 sparse layer: sigmoid scores, group-limited top-k, score-correction bias, shared experts;
    `overrides` for the families that reuse its router with other experts (Nemotron-H)."""
    args = dict(top=hf.num_experts_per_tok, experts=hf.n_routed_experts, d_ff=hf.moe_intermediate_size, shared=hf.n_shared_experts,
                router="sigmoid", norm_topk=bool(hf.norm_topk_prob), scale=float(hf.routed_scaling_factor), groups=hf.n_group,
                top_groups=hf.topk_group, balance="bias")
    return call("moe", "ffn", config, **args | overrides)


def mla_config(hf: Any) -> ModelConfig:
    """The settings of a DeepSeek MLA decoder: its RoPE (interleaved pairs as `rope_interleave` says) as the model's `rope`."""
    refuse(getattr(hf, "attention_bias", False), "the transformers config has attention_bias = true; nanollm attention has no biases")
    refuse(hf.hidden_act != "silu", f"transformers hidden_act {hf.hidden_act!r} is not supported here (only silu, as SwiGLU)")
    refuse(hf.num_key_value_heads != hf.num_attention_heads,
           f"num_key_value_heads = {hf.num_key_value_heads} differs from num_attention_heads = {hf.num_attention_heads}: "
           "MLA decompresses keys for every head")
    refuse(float(hf.rms_norm_eps) != LATENT_NORM_EPS,
           f"rms_norm_eps = {hf.rms_norm_eps:g}: transformers norms the MLA latents at {LATENT_NORM_EPS:g} whatever it says, "
           "nanollm at rms_norm_eps")
    config = ModelConfig(**common_settings(hf), qk_norm="none", rope_theta=float(hf.rope_parameters["rope_theta"]))
    rope = rope_call(hf.rope_parameters, config)
    rope = call(rope.name, "position", config, **{**rope.kwargs(), "interleaved": bool(getattr(hf, "rope_interleave", True))})
    return dataclasses.replace(config, rope=rope)


def mla_args(hf: Any) -> dict[str, int]:
    """The arguments of an `mla` call from a DeepSeek config's sizes (no q_lora_rank: queries straight from the input)."""
    return dict(kv_lora_rank=hf.kv_lora_rank, q_lora_rank=hf.q_lora_rank or 0, qk_nope_head_dim=hf.qk_nope_head_dim,
                qk_rope_head_dim=hf.qk_rope_head_dim, v_head_dim=hf.v_head_dim)


def deepseek_layers(hf: Any, config: ModelConfig, mixer: Call) -> tuple[Layer, ...]:
    """Pre-norm layers of `mixer`: dense SwiGLU or the MoE as `mlp_layer_types` (V3.2) or `first_k_dense_replace` (V3) say."""
    kinds = getattr(hf, "mlp_layer_types", None) or ["dense" if i < hf.first_k_dense_replace else "sparse" for i in range(hf.num_hidden_layers)]
    ffns = {"dense": call("swiglu", "ffn", config, d_ff=hf.intermediate_size), "sparse": moe_call(hf, config)}
    return tuple(Layer((("mixer", mixer), ("ffn", ffns[kind])), config.residual) for kind in kinds)


def deepseek_v3(hf: Any) -> Arch:
    """DeepseekV3ForCausalLM."""
    config = mla_config(hf)
    return Arch(config, deepseek_layers(hf, config, call("mla", "mixer", config, **mla_args(hf))))


def deepseek_v32(hf: Any) -> Arch:
    """DeepseekV32ForCausalLM: MLA (interleaved RoPE) with the DSA indexer picking `index_topk` keys per query."""
    config = mla_config(hf)
    mixer = call("dsa", "mixer", config, topk=hf.index_topk, index_heads=hf.index_n_heads, index_head_dim=hf.index_head_dim,
                 **mla_args(hf))
    return Arch(config, deepseek_layers(hf, config, mixer))


def deepseek_fields(arch: Arch, mixer: str) -> dict[str, Any] | None:
    """The config fields of a DeepSeek decoder of `mixer` layers (one call) with SwiGLUs and the DeepSeek MoE, for export; None
    if the model is not one."""
    attention = arch.layers[0].mixer
    if attention is None or attention.name != mixer or any(layer.mixer != attention or layer.ffn is None or layer.ffn.name not in ("swiglu", "moe")
                                                            for layer in arch.layers):
        return None
    args, config = attention.kwargs(), arch.config
    dense = next((layer.ffn.kwargs()["d_ff"] for layer in arch.layers if layer.ffn.name == "swiglu"), None)
    moe = next((layer.ffn.kwargs() for layer in arch.layers if layer.ffn.name == "moe"), None)
    experts = {} if moe is None else {
        "moe_intermediate_size": moe["d_ff"], "n_routed_experts": moe["experts"], "num_experts_per_tok": moe["top"], "n_shared_experts": moe["shared"],
        "norm_topk_prob": moe["norm_topk"], "routed_scaling_factor": moe["scale"], "n_group": moe["groups"], "topk_group": moe["top_groups"]}
    return dict(vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=len(arch.layers), num_attention_heads=args["heads"],
                num_key_value_heads=args["heads"], intermediate_size=moe["d_ff"] if dense is None else dense, rms_norm_eps=config.norm_eps,
                tie_word_embeddings=config.tie_embeddings, max_position_embeddings=config.seq_len, kv_lora_rank=args["kv_lora_rank"],
                q_lora_rank=args["q_lora_rank"] or None, qk_nope_head_dim=args["qk_nope_head_dim"], qk_rope_head_dim=args["qk_rope_head_dim"],
                v_head_dim=args["v_head_dim"], rope_parameters=rope_parameters(args["rope"]), rope_interleave=args["rope"].kwargs().get("interleaved", True),
                **experts)


def deepseek_v3_config(arch: Arch) -> Any:
    """A DeepseekV3Config of a model of `mla` layers whose dense SwiGLUs all come before its MoEs, or None."""
    from transformers import DeepseekV3Config

    fields = deepseek_fields(arch, "mla")
    if fields is None:
        return None
    kinds = [layer.ffn.name for layer in arch.layers]
    if kinds != sorted(kinds, key=lambda kind: kind == "moe"):
        return None
    return DeepseekV3Config(**fields, first_k_dense_replace=kinds.count("swiglu"))


def deepseek_v32_config(arch: Arch) -> Any:
    """A DeepseekV32Config of a model of `dsa` layers with SwiGLUs and MoEs (in any order), or None."""
    from transformers import DeepseekV32Config

    fields = deepseek_fields(arch, "dsa")
    if fields is None:
        return None
    args = arch.layers[0].mixer.kwargs()
    return DeepseekV32Config(**fields, index_topk=args["topk"], index_n_heads=args["index_heads"], index_head_dim=args["index_head_dim"],
                             mlp_layer_types=["dense" if layer.ffn.name == "swiglu" else "sparse" for layer in arch.layers])


family("deepseek_v3", Family(("DeepseekV3ForCausalLM",), deepseek_v3, config_from_arch=deepseek_v3_config))
family("deepseek_v32", Family(("DeepseekV32ForCausalLM",), deepseek_v32, config_from_arch=deepseek_v32_config))
