"""OLMo 2 and 3: post-norm ("reordered") residuals, QK-norm over the whole q and k projections, SwiGLU; OLMo 3
adds 3 sliding : 1 full layers, each layer type with its own RoPE (YaRN on the full layers of long-context models)."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..ir import Arch, Call, Layer, ModelConfig
from . import Family, attention_only, call, common_fields, common_settings, family, layer_type_rope, layer_types, refuse, rope_call, rope_parameters


def olmo_config(hf: Any, rope_parameters: dict[str, Any]) -> ModelConfig:
    """The settings of an OLMo 2/3 decoder, the model's RoPE taken from `rope_parameters`."""
    refuse(hf.attention_bias, "the transformers config has attention_bias = true; nanollm attention has no biases")
    refuse(hf.hidden_act != "silu", f"transformers hidden_act {hf.hidden_act!r} is not supported here (only silu, as SwiGLU)")
    config = ModelConfig(**common_settings(hf), qk_norm="projection", rope_theta=float(rope_parameters["rope_theta"]),
                         residual=Call("postnorm"))
    return dataclasses.replace(config, rope=rope_call(rope_parameters, config))


def post_norm_layers(config: ModelConfig, mixers: list[Call], d_ff: int) -> tuple[Layer, ...]:
    """Post-norm layers of these mixers, each with a SwiGLU."""
    ffn = call("swiglu", "ffn", config, d_ff=d_ff)
    return tuple(Layer((("mixer", mixer), ("ffn", ffn)), config.residual) for mixer in mixers)


def olmo2(hf: Any) -> Arch:
    """Olmo2ForCausalLM: every layer global, one RoPE."""
    config = olmo_config(hf, hf.rope_parameters)
    return Arch(config, post_norm_layers(config, [call("global", "mixer", config)] * hf.num_hidden_layers, hf.intermediate_size))


def olmo3(hf: Any) -> Arch:
    """Olmo3ForCausalLM: layer_types of full and sliding attention, rope_parameters per layer type.

    transformers' Olmo3Config(rope_theta=x) sets only the full layers' theta; the sliding layers keep theirs,
    so each type's parameters are read from rope_parameters, never from rope_theta.
    """
    config = olmo_config(hf, layer_type_rope(hf, "full_attention"))
    local = rope_call(layer_type_rope(hf, "sliding_attention"), config)
    mixers = {
        "full_attention": call("global", "mixer", config),
        "sliding_attention": call("sliding", "mixer", config, window=hf.sliding_window, rope=local),
    }
    for layer_type in hf.layer_types:
        refuse(layer_type not in mixers, f"OLMo 3 layer type {layer_type!r} is not supported")
    return Arch(config, post_norm_layers(config, [mixers[t] for t in hf.layer_types], hf.intermediate_size))


def olmo2_config(arch: Arch) -> Any:
    """An Olmo2Config of a model of global layers with SwiGLUs, or None."""
    from transformers import Olmo2Config

    if not attention_only(arch, ("swiglu",)) or layer_types(arch)[1] is not None:
        return None
    return Olmo2Config(**common_fields(arch, arch.layers[0].ffn.kwargs()["d_ff"]), rope_parameters=rope_parameters(arch.layers[0].mixer.kwargs()["rope"]),
                       hidden_act="silu", eos_token_id=None, pad_token_id=None)


def olmo3_config(arch: Arch) -> Any:
    """An Olmo3Config of a model of global and sliding layers with SwiGLUs, or None."""
    from transformers import Olmo3Config

    if not attention_only(arch, ("swiglu",)):
        return None
    types, window = layer_types(arch)
    ropes = {kind: rope_parameters(layer.mixer.kwargs()["rope"]) for kind, layer in zip(types, arch.layers)}
    return Olmo3Config(**common_fields(arch, arch.layers[0].ffn.kwargs()["d_ff"]), layer_types=types, sliding_window=window or 4096, hidden_act="silu",
                       rope_parameters={kind: ropes.get(kind, ropes[types[0]]) for kind in ("full_attention", "sliding_attention")},
                       eos_token_id=None, pad_token_id=None)


family("olmo2", Family(("Olmo2ForCausalLM",), olmo2, config_from_arch=olmo2_config))
family("olmo3", Family(("Olmo3ForCausalLM",), olmo3, config_from_arch=olmo3_config))
