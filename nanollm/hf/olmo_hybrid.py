"""OLMo-hybrid: gated DeltaNet layers (pre-norm, separate projections, beta in (0, 2)) between OLMo 3 attention layers
(post-norm, QK-norm over the whole projections, RoPE, or none without a rope_theta), each with a SwiGLU."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..ir import Arch, Layer, ModelConfig
from . import Family, call, common_fields, common_settings, family, first_attention, refuse, rope_call, rope_parameters
from .qwen3_next import delta_rule_fields

GATED_NORM_EPS = 1e-5  # transformers' OlmoHybridRMSNormGated keeps fla's epsilon whatever rms_norm_eps says


def olmo_hybrid(hf: Any) -> Arch:
    """OlmoHybridForCausalLM."""
    refuse(hf.attention_bias, "the transformers config has attention_bias = true; nanollm attention has no biases")
    refuse(hf.hidden_act != "silu", f"transformers hidden_act {hf.hidden_act!r} is not supported here (only silu, as SwiGLU)")
    rope = hf.rope_parameters if hf.rope_parameters and hf.rope_parameters.get("rope_theta") is not None else None
    config = ModelConfig(**common_settings(hf), qk_norm="projection", rope_theta=float(rope["rope_theta"]) if rope else 1e4)
    config = dataclasses.replace(config, rope=rope_call(rope, config))
    ffn = call("swiglu", "ffn", config, d_ff=hf.intermediate_size)
    kinds = {
        "linear_attention": (call("gdn", "mixer", config, heads=hf.linear_num_value_heads, key_heads=hf.linear_num_key_heads,
                                  head_dim=hf.linear_key_head_dim, value_dim=hf.linear_value_head_dim, conv=hf.linear_conv_kernel_dim,
                                  negative_eigenvalues=bool(hf.linear_allow_neg_eigval), gate_eps=GATED_NORM_EPS),
                             call("prenorm", "residual", config)),
        "full_attention": (call("global", "mixer", config), call("postnorm", "residual", config)),
    }
    for layer_type in hf.layer_types:
        refuse(layer_type not in kinds, f"OLMo-hybrid layer type {layer_type!r} is not supported")
    return Arch(config, tuple(Layer((("mixer", kinds[t][0]), ("ffn", ffn)), kinds[t][1]) for t in hf.layer_types))


def olmo_hybrid_config(arch: Arch) -> Any:
    """An OlmoHybridConfig of a model of pre-norm gated DeltaNet and post-norm attention layers with SwiGLUs, or None."""
    from transformers import OlmoHybridConfig

    def kind(layer: Layer) -> str | None:
        if layer.mixer is None or layer.ffn is None or layer.ffn.name != "swiglu":
            return None
        if layer.mixer.name == "gdn" and layer.residual.name == "prenorm":
            return "linear_attention"
        return "full_attention" if layer.mixer.name == "global" and layer.residual.name == "postnorm" else None

    types = [kind(layer) for layer in arch.layers]
    if None in types or "full_attention" not in types or "linear_attention" not in types:  # attention alone is OLMo 2's to export
        return None
    # the DeltaNet layers' beta range (every layer's, checked by the import)
    linear = dict(delta_rule_fields(arch), linear_allow_neg_eigval=next(layer.mixer.kwargs()["negative_eigenvalues"] for layer in arch.layers
                                                                        if layer.mixer.name == "gdn"))
    # no rope_theta: attention without a position encoding (transformers fills in a default for rope_parameters=None)
    rope = rope_parameters(first_attention(arch)["rope"]) or {"rope_type": "default", "rope_theta": None}
    return OlmoHybridConfig(**common_fields(arch, arch.layers[0].ffn.kwargs()["d_ff"]), **linear, layer_types=types, rope_parameters=rope,
                            hidden_act="silu", eos_token_id=None, pad_token_id=None)


family("olmo_hybrid", Family(("OlmoHybridForCausalLM",), olmo_hybrid, config_from_arch=olmo_hybrid_config))
