"""Gemma 3: sandwich norms, (1 + w) RMSNorm, sqrt(d) embeddings, GeGLU, a RoPE per layer type, the final soft-cap,
the query_pre_attn_scalar logit scale; the text model of Gemma3ForCausalLM and of Gemma3ForConditionalGeneration."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..ir import Arch, Call, Layer, ModelConfig
from . import Family, attention_only, call, common_fields, common_settings, family, layer_type_rope, layer_types, refuse, rope_call, rope_parameters


def gemma3_text(hf: Any) -> Arch:
    """A Gemma3TextConfig's model."""
    refuse(getattr(hf, "use_bidirectional_attention", False), "Gemma 3 with use_bidirectional_attention is not causal; nanollm is")
    refuse(hf.attention_bias, "the transformers config has attention_bias = true; nanollm attention has no biases")
    refuse(hf.hidden_activation != "gelu_pytorch_tanh",
           f"Gemma 3 hidden_activation {hf.hidden_activation!r} is not supported (gelu_pytorch_tanh is, as geglu)")
    head_dim = hf.head_dim
    scale = 0.0 if hf.query_pre_attn_scalar == head_dim else float(hf.query_pre_attn_scalar) ** -0.5
    full = layer_type_rope(hf, "full_attention")
    # No attention soft-cap: transformers' Gemma3Attention never applies attn_logit_softcapping (Gemma 3 replaced
    # Gemma 2's soft-cap with QK-norm), so a config setting it runs uncapped there.
    config = ModelConfig(
        **common_settings(hf), qk_norm="head", rope_theta=float(full["rope_theta"]), norm=Call("rmsnorm", (("zero_centered", True),)),
        residual=Call("sandwich"), attn_scale=scale, logit_softcap=float(hf.final_logit_softcapping or 0.0), embed_scale=True,
    )
    config = dataclasses.replace(config, rope=rope_call(full, config))
    local = rope_call(layer_type_rope(hf, "sliding_attention"), config)
    ffn = call("geglu", "ffn", config, d_ff=hf.intermediate_size)
    mixers = {
        "full_attention": call("global", "mixer", config),
        "sliding_attention": call("sliding", "mixer", config, window=hf.sliding_window, rope=local),
    }
    for layer_type in hf.layer_types:
        refuse(layer_type not in mixers, f"Gemma 3 layer type {layer_type!r} is not supported")
    return Arch(config, tuple(Layer((("mixer", mixers[t]), ("ffn", ffn)), config.residual) for t in hf.layer_types))


def gemma3(hf: Any) -> Arch:
    """A Gemma3Config (image-text): its text model; the vision tower is not nanollm's."""
    arch = gemma3_text(hf.text_config)
    # transformers ties this model's head by the outer config's tie_word_embeddings, not the text config's
    return Arch(dataclasses.replace(arch.config, tie_embeddings=bool(hf.tie_word_embeddings)), arch.layers)


def gemma3_text_config(arch: Arch) -> Any:
    """A Gemma3TextConfig of a model of global and sliding layers with GeGLUs, or None."""
    from transformers import Gemma3TextConfig

    if not attention_only(arch, ("geglu",)):
        return None
    types, window = layer_types(arch)
    ropes = {kind: rope_parameters(layer.mixer.kwargs()["rope"]) for kind, layer in zip(types, arch.layers)}
    attention, config = arch.layers[0].mixer.kwargs(), arch.config
    # the inverse of scale = query_pre_attn_scalar^-1/2, an integer in every Gemma config
    scalar = attention["head_dim"] if config.attn_scale == 0 else round(config.attn_scale ** -2)
    return Gemma3TextConfig(**common_fields(arch, arch.layers[0].ffn.kwargs()["d_ff"]), layer_types=types, sliding_window=window or 4096,
                            query_pre_attn_scalar=scalar, final_logit_softcapping=config.logit_softcap or None, hidden_activation="gelu_pytorch_tanh",
                            rope_parameters={kind: ropes.get(kind, ropes[types[0]]) for kind in ("full_attention", "sliding_attention")})


family("gemma3_text", Family(("Gemma3ForCausalLM",), gemma3_text, config_from_arch=gemma3_text_config))
family("gemma3", Family(
    ("Gemma3ForConditionalGeneration",), gemma3, decoder="model.language_model.",
    ignored=("model.vision_tower.", "model.multi_modal_projector."),
))
