"""LFM2 (Liquid AI): gated short-convolution layers and Qwen3-like attention layers (per-head QK-norm, RoPE, GQA),
each with a SwiGLU; its own names (operator_norm, ffn_norm, feed_forward.w1/w3/w2, out_proj, embedding_norm)."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..ir import Arch, Layer, ModelConfig
from . import Family, call, common_fields, common_settings, family, first_attention, refuse, rope_call, rope_parameters


def feed_forward_width(hf: Any) -> int:
    """The SwiGLU width LFM2 builds from intermediate_size: 2/3 of it, times the multiplier, rounded up to multiple_of."""
    width = hf.intermediate_size
    if hf.block_auto_adjust_ff_dim:
        width = int(2 * width / 3)
        if hf.block_ffn_dim_multiplier is not None:
            width = int(hf.block_ffn_dim_multiplier * width)
            width = hf.block_multiple_of * ((width + hf.block_multiple_of - 1) // hf.block_multiple_of)
    return width


def lfm2(hf: Any) -> Arch:
    """Lfm2ForCausalLM."""
    config = ModelConfig(**{**common_settings(hf), "d_ff": feed_forward_width(hf)}, qk_norm="head",
                         rope_theta=float(hf.rope_parameters["rope_theta"]))
    config = dataclasses.replace(config, rope=rope_call(hf.rope_parameters, config))
    mixers = {"full_attention": call("global", "mixer", config), "conv": call("shortconv", "mixer", config, kernel=hf.conv_L_cache,
                                                                              bias=bool(hf.conv_bias))}
    ffn = call("swiglu", "ffn", config)
    for layer_type in hf.layer_types:
        refuse(layer_type not in mixers, f"LFM2 layer type {layer_type!r} is not supported (full_attention and conv are)")
    return Arch(config, tuple(Layer((("mixer", mixers[t]), ("ffn", ffn)), config.residual) for t in hf.layer_types))


def lfm2_config(arch: Arch) -> Any:
    """An Lfm2Config of a model of short-convolution and attention layers with SwiGLUs, or None."""
    from transformers import Lfm2Config

    kinds = {"shortconv": "conv", "global": "full_attention"}
    if not all(layer.mixer is not None and layer.mixer.name in kinds and layer.ffn is not None and layer.ffn.name == "swiglu"
               for layer in arch.layers):
        return None
    types = [kinds[layer.mixer.name] for layer in arch.layers]
    if "full_attention" not in types or "conv" not in types:  # attention alone is Qwen3's to export
        return None
    conv = next(layer.mixer.kwargs() for layer in arch.layers if layer.mixer.name == "shortconv")
    fields = common_fields(arch, arch.layers[0].ffn.kwargs()["d_ff"])
    fields["norm_eps"] = fields.pop("rms_norm_eps")
    del fields["attention_bias"]  # LFM2's attention has none, and no such field
    # the SwiGLU width as it is, not adjusted (block_auto_adjust_ff_dim)
    return Lfm2Config(**fields, layer_types=types, conv_L_cache=conv["kernel"], conv_bias=conv["bias"], block_auto_adjust_ff_dim=False,
                      rope_parameters=rope_parameters(first_attention(arch)["rope"]), eos_token_id=None, bos_token_id=None, pad_token_id=None)


family("lfm2", Family(("Lfm2ForCausalLM",), lfm2, config_from_arch=lfm2_config, renames=(
    (r"^model\.norm\.", "model.embedding_norm."),
    (r"\.input_layernorm\.", ".operator_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
    (r"\.self_attn\.(q|k)_norm\.", r".self_attn.\1_layernorm."),
    (r"\.mlp\.gate_proj\.", ".feed_forward.w1."),
    (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
    (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
)))
