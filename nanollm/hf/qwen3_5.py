"""Qwen3.5 (text): Qwen3-Next's gated DeltaNet and gated attention with a dense SwiGLU, its projections stored unfused
(in_proj_qkv, in_proj_z, in_proj_b, in_proj_a). Its multimodal RoPE equals partial RoPE on text, where the three
position streams coincide."""
from __future__ import annotations

from typing import Any

from ..ir import Arch
from . import Family, call, family
from .qwen3_next import hybrid_config, hybrid_mixers, pre_norm_layers


def qwen3_5_text(hf: Any) -> Arch:
    """Qwen3_5ForCausalLM."""
    config = hybrid_config(hf)
    dense = call("swiglu", "ffn", config, d_ff=hf.intermediate_size)
    return Arch(config, pre_norm_layers(hybrid_mixers(hf, config, "qwen3_5"), [dense] * hf.num_hidden_layers, config))


family("qwen3_5_text", Family(("Qwen3_5ForCausalLM",), qwen3_5_text))
