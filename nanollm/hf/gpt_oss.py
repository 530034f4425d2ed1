"""GPT-OSS: attention with sinks and biases, alternating sliding and full layers, YaRN, and a MoE with a biased router
(top-k on the logits, softmax over those k) and biased experts running a clamped SwiGLU, stored interleaved."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..ir import Arch, Call, ModelConfig
from . import Family, call, common_settings, family, refuse, rope_call
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


family("gpt_oss", Family(("GptOssForCausalLM",), gpt_oss))
