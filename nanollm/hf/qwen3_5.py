"""Qwen3.5 (text): Qwen3-Next's gated DeltaNet and gated attention with a dense SwiGLU, its projections stored unfused
(in_proj_qkv, in_proj_z, in_proj_b, in_proj_a). Its multimodal RoPE equals partial RoPE on text, where the three
position streams coincide."""
from __future__ import annotations

from typing import Any

from ..ir import Arch
from . import Family, call, family
from .qwen3_next import hybrid_config, hybrid_fields, hybrid_mixers, pre_norm_layers


def qwen3_5_text(hf: Any) -> Arch:
    """Qwen3_5ForCausalLM."""
    config = hybrid_config(hf)
    dense = call("swiglu", "ffn", config, d_ff=hf.intermediate_size)
    return Arch(config, pre_norm_layers(hybrid_mixers(hf, config, "qwen3_5"), [dense] * hf.num_hidden_layers, config))


def qwen3_5_text_config(arch: Arch) -> Any:
    """A Qwen3_5TextConfig of a model of gated DeltaNet (qwen3_5 layout) and attention layers with SwiGLUs, or None."""
    from transformers import Qwen3_5TextConfig

    dense = next((layer.ffn.kwargs()["d_ff"] for layer in arch.layers if layer.ffn is not None), None)
    fields = hybrid_fields(arch, "qwen3_5", ("swiglu",), dense) if dense is not None else None
    return Qwen3_5TextConfig(**fields) if fields else None


family("qwen3_5_text", Family(("Qwen3_5ForCausalLM",), qwen3_5_text, config_from_arch=qwen3_5_text_config))
