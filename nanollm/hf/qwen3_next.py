"""Qwen3-Next: gated DeltaNet and gated-attention layers (3 : 1 by default), (1 + w) RMSNorm everywhere (QK-norm
included), partial RoPE, and a softmax MoE whose shared expert a sigmoid gate scales per token."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..ir import Arch, Call, Layer, ModelConfig
from . import Family, call, common_fields, common_settings, family, first_attention, refuse, rope_call, rope_parameters

ZERO_CENTERED = Call("rmsnorm", (("zero_centered", True),))


def hybrid_config(hf: Any) -> ModelConfig:
    """The settings of a Qwen3-Next / Qwen3.5 decoder: (1 + w) norms, per-head QK-norm, partial RoPE."""
    refuse(getattr(hf, "attention_bias", False), "the transformers config has attention_bias = true; nanollm attention has no biases")
    refuse(hf.hidden_act != "silu", f"transformers hidden_act {hf.hidden_act!r} is not supported here (only silu)")
    config = ModelConfig(**common_settings(hf), qk_norm="head", rope_theta=float(hf.rope_parameters["rope_theta"]), norm=ZERO_CENTERED)
    return dataclasses.replace(config, rope=rope_call(hf.rope_parameters, config, partial=True))


def hybrid_mixers(hf: Any, config: ModelConfig, layout: str) -> list[Call]:
    """Each layer's mixer by layer_types: gated DeltaNet in `layout`, or attention with Qwen3-Next's elementwise output gate."""
    mixers = {
        "linear_attention": call("gdn", "mixer", config, heads=hf.linear_num_value_heads, key_heads=hf.linear_num_key_heads,
                                 head_dim=hf.linear_key_head_dim, value_dim=hf.linear_value_head_dim, conv=hf.linear_conv_kernel_dim,
                                 layout=layout),
        "full_attention": call("global", "mixer", config, gate="elementwise"),
    }
    for layer_type in hf.layer_types:
        refuse(layer_type not in mixers, f"transformers layer type {layer_type!r} is not supported (linear_attention, full_attention)")
    return [mixers[t] for t in hf.layer_types]


def pre_norm_layers(mixers: list[Call], ffns: list[Call], config: ModelConfig) -> tuple[Layer, ...]:
    """Pre-norm layers of these mixers and FFNs."""
    return tuple(Layer((("mixer", m), ("ffn", f)), config.residual) for m, f in zip(mixers, ffns))


def moe_call(hf: Any, config: ModelConfig) -> Call:
    """A Qwen3-Next sparse layer: softmax top-k and one shared expert of shared_expert_intermediate_size, gated per token."""
    shared, rest = divmod(hf.shared_expert_intermediate_size, hf.moe_intermediate_size)
    refuse(rest != 0 or shared == 0, f"shared_expert_intermediate_size {hf.shared_expert_intermediate_size} is not a multiple of "
                                     f"moe_intermediate_size {hf.moe_intermediate_size}, which nanollm's shared experts are made of")
    return call("moe", "ffn", config, top=hf.num_experts_per_tok, experts=hf.num_experts, d_ff=hf.moe_intermediate_size, shared=shared,
                shared_gate=True, norm_topk=bool(hf.norm_topk_prob), aux=float(hf.router_aux_loss_coef))


def qwen3_next(hf: Any) -> Arch:
    """Qwen3NextForCausalLM: sparse layers every decoder_sparse_step, except the mlp_only_layers."""
    config = hybrid_config(hf)
    dense = call("swiglu", "ffn", config, d_ff=hf.intermediate_size)
    sparse = moe_call(hf, config) if hf.num_experts > 0 else dense
    ffns = [sparse if i not in hf.mlp_only_layers and (i + 1) % hf.decoder_sparse_step == 0 else dense for i in range(hf.num_hidden_layers)]
    return Arch(config, pre_norm_layers(hybrid_mixers(hf, config, "qwen3_next"), ffns, config))


def delta_rule_fields(arch: Arch) -> dict[str, Any]:
    """The linear_* config fields of the first gated DeltaNet among the layers (the inverse of `hybrid_mixers`); none if there is none."""
    delta = next((layer.mixer.kwargs() for layer in arch.layers if layer.mixer is not None and layer.mixer.name == "gdn"), None)
    if delta is None:
        return {}
    return dict(linear_num_value_heads=delta["heads"], linear_num_key_heads=delta["key_heads"] or delta["heads"],
                linear_key_head_dim=delta["head_dim"], linear_value_head_dim=delta["value_dim"] or delta["head_dim"],
                linear_conv_kernel_dim=delta["conv"])


def hybrid_fields(arch: Arch, layout: str, ffns: tuple[str, ...], d_ff: int) -> dict[str, Any] | None:
    """The config fields of a Qwen3-Next / Qwen3.5 decoder (gated DeltaNet in `layout` and attention layers, these FFNs),
    or None if the layers are others; the FFN's own fields are the caller's."""
    def kind(layer: Layer) -> str | None:
        if layer.mixer is None or layer.ffn is None or layer.ffn.name not in ffns:
            return None
        if layer.mixer.name == "gdn" and layer.mixer.kwargs()["layout"] == layout:
            return "linear_attention"
        return "full_attention" if layer.mixer.name == "global" else None

    types = [kind(layer) for layer in arch.layers]
    if None in types or "full_attention" not in types:
        return None
    return dict(common_fields(arch, d_ff), **delta_rule_fields(arch), layer_types=types, rope_parameters=rope_parameters(first_attention(arch)["rope"]),
                hidden_act="silu")


def qwen3_next_config(arch: Arch) -> Any:
    """A Qwen3NextConfig of a model of gated DeltaNet (qwen3_next layout) and attention layers with shared-expert MoEs
    (and dense SwiGLUs), or None."""
    from transformers import Qwen3NextConfig

    sparse = [layer.ffn.kwargs() for layer in arch.layers if layer.ffn is not None and layer.ffn.name == "moe"]
    dense = [layer.ffn.kwargs()["d_ff"] for layer in arch.layers if layer.ffn is not None and layer.ffn.name == "swiglu"]
    if not sparse:
        return None
    moe = sparse[0]
    fields = hybrid_fields(arch, "qwen3_next", ("moe", "swiglu"), dense[0] if dense else moe["d_ff"])
    if fields is None:
        return None
    return Qwen3NextConfig(**fields, num_experts=moe["experts"], num_experts_per_tok=moe["top"], moe_intermediate_size=moe["d_ff"],
                           shared_expert_intermediate_size=moe["shared"] * moe["d_ff"], norm_topk_prob=moe["norm_topk"],
                           router_aux_loss_coef=moe["aux"], decoder_sparse_step=1,
                           mlp_only_layers=[i for i, layer in enumerate(arch.layers) if layer.ffn.name == "swiglu"])


family("qwen3_next", Family(("Qwen3NextForCausalLM",), qwen3_next, config_from_arch=qwen3_next_config))
