"""Nemotron-H (NVIDIA): a pattern of single-sublayer blocks, each one pre-norm sublayer: Mamba-2, NoPE GQA attention
without QK-norm, a ReLU^2 MLP or a MoE of ReLU^2 experts with DeepSeek-V3's routing; its own names (embeddings, norm, mixer, norm_f)."""
from __future__ import annotations

from typing import Any

from ..ir import Arch, Call, Layer, ModelConfig
from . import Family, call, common_settings, family, refuse
from .deepseek import moe_call


def nemotron_h(hf: Any) -> Arch:
    """NemotronHForCausalLM: mamba, attention, mlp and moe blocks."""
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
        refuse(block_type not in (*blocks, "moe"),
               f"Nemotron-H block type {block_type!r} is not supported (mamba, attention, mlp and moe are)")
    if "moe" in hf.layers_block_type:
        blocks["moe"] = ("ffn", moe_block(hf, config))
    return Arch(config, tuple(Layer((blocks[t],), config.residual) for t in hf.layers_block_type))


def moe_block(hf: Any, config: ModelConfig) -> Call:
    """A Nemotron-H MoE block: DeepSeek-V3's routing over squared-ReLU experts, one squared-ReLU shared expert."""
    refuse(hf.moe_latent_size is not None, "Nemotron-H MoE with moe_latent_size (latent expert projections) is not supported")
    refuse(hf.mlp_bias, "Nemotron-H MoE with mlp_bias = true is not supported (nanollm's shared experts have no biases)")
    shared_width, expert_width = hf.moe_shared_expert_intermediate_size, hf.moe_intermediate_size
    # transformers' one shared MLP of width s is nanollm's s / f shared experts of width f (one MLP of width s, the same model)
    refuse(shared_width % expert_width != 0, f"Nemotron-H moe_shared_expert_intermediate_size = {shared_width} is not a multiple of "
           f"moe_intermediate_size = {expert_width}")
    return moe_call(hf, config, shared=shared_width // expert_width, activation="relu2")


def nemotron_h_config(arch: Arch) -> Any:
    """A NemotronHConfig of a model of single-sublayer pre-norm blocks (Mamba-2, attention, ReLU^2 MLP), or None."""
    from transformers import NemotronHConfig

    from . import common_fields, first_attention

    kinds = {"mamba2": "linear_attention", "global": "full_attention", "relu2": "mlp"}
    calls = [layer.sublayers[0][1] for layer in arch.layers]
    if not all(len(layer.sublayers) == 1 and layer.residual.name == "prenorm" for layer in arch.layers) or \
            not all(call.name in kinds for call in calls) or first_attention(arch) is None:
        return None
    first = {call.name: call.kwargs() for call in reversed(calls)}  # each kind's first call (the import checks the rest)
    mlp = first.get("relu2", {"d_ff": arch.config.d_ff, "bias": False})
    mamba = {}
    if "mamba2" in first:
        ssm = first["mamba2"]
        mamba = dict(mamba_num_heads=ssm["heads"], mamba_head_dim=ssm["head_dim"], ssm_state_size=ssm["state"], n_groups=ssm["groups"],
                     conv_kernel=ssm["conv"], chunk_size=ssm["chunk"], time_step_min=ssm["dt_min"], use_conv_bias=ssm["conv_bias"],
                     use_bias=ssm["bias"])
    fields = common_fields(arch, mlp["d_ff"])
    fields["layer_norm_epsilon"] = fields.pop("rms_norm_eps")
    return NemotronHConfig(**fields, **mamba, layers_block_type=[kinds[call.name] for call in calls], mlp_bias=mlp["bias"], mlp_hidden_act="relu2",
                           mamba_hidden_act="silu", sliding_window=None, eos_token_id=None, bos_token_id=None, pad_token_id=None)


family("nemotron_h", Family(("NemotronHForCausalLM",), nemotron_h, config_from_arch=nemotron_h_config, renames=(
    (r"^model\.embed_tokens\.", "model.embeddings."),
    (r"^model\.norm\.", "model.norm_f."),
    (r"\.(input_layernorm|post_attention_layernorm)\.", ".norm."),
    (r"\.(self_attn|mixer|mlp)\.", ".mixer."),
)))
