"""Qwen3 and Qwen3-MoE: pre-norm, per-head QK-norm, RoPE, full or sliding layers, SwiGLU or a softmax MoE."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..ir import Arch, Call, Layer, ModelConfig
from . import (
    Family, attention_only, call, common_fields, common_settings, family, first_attention, layer_types, refuse, rope_call, rope_parameters,
)


def attention_layers(hf: Any, config: ModelConfig) -> list[Call]:
    """Each layer's mixer: Qwen3 lists layer_types; Qwen3-MoE and Mixtral slide on every layer or none."""
    layer_types = getattr(hf, "layer_types", None) or (
        ["full_attention" if hf.sliding_window is None else "sliding_attention"] * hf.num_hidden_layers
    )
    mixers = []
    for layer_type in layer_types:
        refuse(layer_type not in ("full_attention", "sliding_attention"),
               f"transformers layer type {layer_type!r} is not supported (only full_attention, sliding_attention)")
        if layer_type == "full_attention":
            mixers.append(call("global", "mixer", config))
        else:
            refuse(hf.sliding_window is None, "the transformers config has sliding_attention layers but no sliding_window "
                                             "(use_sliding_window is false)")
            mixers.append(call("sliding", "mixer", config, window=hf.sliding_window))
    return mixers


def gqa_config(hf: Any, qk_norm: str) -> ModelConfig:
    """The settings of a Qwen3-style decoder (a single rope_parameters for every layer), refusing what differs."""
    refuse(getattr(hf, "attention_bias", False), "the transformers config has attention_bias = true; nanollm attention has no biases")
    refuse(hf.hidden_act != "silu", f"transformers hidden_act {hf.hidden_act!r} is not supported here (only silu, as SwiGLU)")
    config = ModelConfig(**common_settings(hf), qk_norm=qk_norm, rope_theta=float(hf.rope_parameters["rope_theta"]))
    return dataclasses.replace(config, rope=rope_call(hf.rope_parameters, config))


def layers(mixers: list[Call], ffns: list[Call], config: ModelConfig) -> tuple[Layer, ...]:
    """Pre-norm layers of these mixers and FFNs."""
    return tuple(Layer((("mixer", m), ("ffn", f)), config.residual) for m, f in zip(mixers, ffns))


def qwen3(hf: Any) -> Arch:
    """Qwen3ForCausalLM."""
    config = gqa_config(hf, "head")
    dense = call("swiglu", "ffn", config, d_ff=hf.intermediate_size)
    return Arch(config, layers(attention_layers(hf, config), [dense] * hf.num_hidden_layers, config))


def moe_call(hf: Any, config: ModelConfig) -> Call:
    """The `moe` call of a Qwen3-MoE sparse layer: softmax top-k, renormalised or not."""
    return call("moe", "ffn", config, top=hf.num_experts_per_tok, experts=hf.num_experts, d_ff=hf.moe_intermediate_size,
                norm_topk=bool(hf.norm_topk_prob), aux=float(hf.router_aux_loss_coef))


def qwen3_moe(hf: Any) -> Arch:
    """Qwen3MoeForCausalLM: sparse layers every decoder_sparse_step, except the mlp_only_layers."""
    config = gqa_config(hf, "head")
    dense = call("swiglu", "ffn", config, d_ff=hf.intermediate_size)
    sparse = moe_call(hf, config)
    ffns = [sparse if i not in hf.mlp_only_layers and hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0 else dense
            for i in range(hf.num_hidden_layers)]
    return Arch(config, layers(attention_layers(hf, config), ffns, config))


def attention_fields(arch: Arch, d_ff: int) -> dict[str, Any]:
    """The config fields of a Qwen3-style decoder (one RoPE, sliding layers or not), for export."""
    window = layer_types(arch)[1]
    return dict(common_fields(arch, d_ff), rope_parameters=rope_parameters(first_attention(arch)["rope"]), use_sliding_window=window is not None,
                sliding_window=window, hidden_act="silu")


def qwen3_config(arch: Arch) -> Any:
    """A Qwen3Config of a model of global and sliding layers with SwiGLUs, or None."""
    from transformers import Qwen3Config

    if not attention_only(arch, ("swiglu",)):
        return None
    return Qwen3Config(**attention_fields(arch, arch.layers[0].ffn.kwargs()["d_ff"]), layer_types=layer_types(arch)[0])


def qwen3_moe_config(arch: Arch) -> Any:
    """A Qwen3MoeConfig of a model of attention layers with softmax MoEs (and dense SwiGLUs), or None."""
    from transformers import Qwen3MoeConfig

    if not attention_only(arch, ("swiglu", "moe")):
        return None
    sparse = [layer.ffn.kwargs() for layer in arch.layers if layer.ffn.name == "moe"]
    dense = [layer.ffn.kwargs()["d_ff"] for layer in arch.layers if layer.ffn.name == "swiglu"]
    if not sparse:
        return None
    moe = sparse[0]
    return Qwen3MoeConfig(**attention_fields(arch, dense[0] if dense else moe["d_ff"]), num_experts=moe["experts"], num_experts_per_tok=moe["top"],
                          moe_intermediate_size=moe["d_ff"], norm_topk_prob=moe["norm_topk"], router_aux_loss_coef=moe["aux"], decoder_sparse_step=1,
                          mlp_only_layers=[i for i, layer in enumerate(arch.layers) if layer.ffn.name == "swiglu"])


family("qwen3", Family(("Qwen3ForCausalLM",), qwen3, config_from_arch=qwen3_config))
family("qwen3_moe", Family(("Qwen3MoeForCausalLM",), qwen3_moe, config_from_arch=qwen3_moe_config))
