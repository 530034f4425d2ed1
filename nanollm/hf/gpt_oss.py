"""GPT-OSS: attention with sinks and biases, alternating sliding and full layers, YaRN, and a MoE with a biased router
(top-k on the logits, softmax over those k) and biased experts running a clamped SwiGLU, stored interleaved."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..ir import Arch, Call, ModelConfig
from . import (
    Family,
    attention_only,
    call,
    common_fields,
    common_settings,
    family,
    layer_types,
    refuse,
    rope_call,
    rope_parameters,
)
from .qwen3 import layers


def moe_call(hf: Any, config: ModelConfig) -> Call:
    """The `moe` call of a GPT-OSS layer: its router, expert biases, clamped SwiGLU and weight layout."""
    return call("moe", "ffn", config, top=hf.num_experts_per_tok, experts=hf.num_local_experts, d_ff=hf.intermediate_size,
                router="topk_softmax", router_bias=True, expert_bias=True, alpha=float(hf.swiglu_alpha), limit=float(hf.swiglu_limit),
                up_offset=1.0, layout="gpt_oss", aux=float(hf.router_aux_loss_coef))


def gpt_oss(hf: Any) -> Arch:
    """GptOssForCausalLM."""
    config = ModelConfig(**common_settings(hf), qk_norm="none", rope_theta=float(hf.rope_parameters["rope_theta"]))
    config = dataclasses.replace(config, rope=rope_call(hf.rope_parameters, config))
    attention = {"sinks": True, "bias": bool(hf.attention_bias)}
    mixers = {"full_attention": call("global", "mixer", config, **attention)}
    if hf.sliding_window is not None:
        mixers["sliding_attention"] = call("sliding", "mixer", config, window=hf.sliding_window, **attention)
    for layer_type in hf.layer_types:
        refuse(layer_type not in mixers, f"GPT-OSS layer type {layer_type!r} is not supported (full_attention, and sliding_attention "
                                         "with a sliding_window)")
    sparse = moe_call(hf, config)
    return Arch(config, layers([mixers[t] for t in hf.layer_types], [sparse] * hf.num_hidden_layers, config))


def gpt_oss_config(arch: Arch) -> Any:
    """A GptOssConfig of a model of global and sliding layers with MoEs, or None."""
    from transformers import GptOssConfig

    if not attention_only(arch, ("moe",)):
        return None
    attention, moe = arch.layers[0].mixer.kwargs(), arch.layers[0].ffn.kwargs()
    types, window = layer_types(arch)
    return GptOssConfig(**dict(common_fields(arch, moe["d_ff"]), attention_bias=attention["bias"]), layer_types=types, sliding_window=window,
                        rope_parameters=rope_parameters(attention["rope"]), num_local_experts=moe["experts"], num_experts_per_tok=moe["top"],
                        swiglu_alpha=moe["alpha"], swiglu_limit=moe["limit"], router_aux_loss_coef=moe["aux"])


family("gpt_oss", Family(("GptOssForCausalLM",), gpt_oss, config_from_arch=gpt_oss_config))
