"""Nemotron-H (NVIDIA): a pattern of single-sublayer blocks, each one pre-norm sublayer: Mamba-2, NoPE GQA attention
without QK-norm, or a ReLU^2 MLP; its own names (embeddings, norm, mixer, norm_f)."""
from __future__ import annotations

from typing import Any

from ..ir import Arch, Call, Layer, ModelConfig
from . import Family, call, common_settings, family, refuse


def nemotron_h(hf: Any) -> Arch:
    """NemotronHForCausalLM (its dense layers: mamba, attention and mlp blocks)."""
    refuse(hf.attention_bias, "the transformers config has attention_bias = true; nanollm attention has no biases")
    refuse(hf.mamba_hidden_act != "silu", f"Nemotron-H mamba_hidden_act {hf.mamba_hidden_act!r} is not supported (silu is)")
    refuse(hf.mlp_hidden_act != "relu2", f"Nemotron-H mlp_hidden_act {hf.mlp_hidden_act!r} is not supported (relu2 is)")
    refuse(hf.sliding_window is not None, "Nemotron-H with a sliding_window is not supported")
    config = ModelConfig(**common_settings(hf), qk_norm="none", rope=Call("nope"))
    blocks = {
        "linear_attention": ("mixer", call("mamba2", "mixer", config, heads=hf.mamba_num_heads, head_dim=hf.mamba_head_dim,
                                           state=hf.ssm_state_size, groups=hf.n_groups, conv=hf.conv_kernel, chunk=hf.chunk_size,
                                           dt_min=float(hf.time_step_min), conv_bias=bool(hf.use_conv_bias), bias=bool(hf.use_bias))),
        "full_attention": ("mixer", call("global", "mixer", config)),
        "mlp": ("ffn", call("relu2", "ffn", config, d_ff=hf.intermediate_size, bias=bool(hf.mlp_bias))),
    }
    for block_type in hf.layers_block_type:
        refuse(block_type not in blocks, f"Nemotron-H block type {block_type!r} is not supported (mamba, attention and mlp are)")
    return Arch(config, tuple(Layer((blocks[t],), config.residual) for t in hf.layers_block_type))


family("nemotron_h", Family(("NemotronHForCausalLM",), nemotron_h, renames=(
    (r"^model\.embed_tokens\.", "model.embeddings."),
    (r"^model\.norm\.", "model.norm_f."),
    (r"\.(input_layernorm|post_attention_layernorm)\.", ".norm."),
    (r"\.(self_attn|mixer|mlp)\.", ".mixer."),
)))
