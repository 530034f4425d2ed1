"""OLMo-hybrid: gated DeltaNet layers (pre-norm, separate projections, beta in (0, 2)) between OLMo 3 attention layers
(post-norm, QK-norm over the whole projections, RoPE, or none without a rope_theta), each with a SwiGLU."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..ir import Arch, Layer, ModelConfig
from . import Family, call, common_settings, family, refuse, rope_call

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


family("olmo_hybrid", Family(("OlmoHybridForCausalLM",), olmo_hybrid))
