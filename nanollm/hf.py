"""Import a transformers Qwen3ForCausalLM: its config -> the nanollm IR, its weights -> the compiled model."""
from __future__ import annotations

import os
import torch
import transformers
from torch import fx

from . import Compiled
from .errors import ArchError
from .ir import Arch, Call, Layer, ModelConfig

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
MLP = ("gate_proj", "up_proj", "down_proj")


def mixer_call(layer_type: str, config: transformers.Qwen3Config) -> Call:
    """The nanollm mixer for one entry of config.layer_types."""
    if layer_type == "full_attention":
        return Call("global")
    if layer_type != "sliding_attention":
        raise ArchError(f"HF layer type {layer_type!r} is not supported (only full_attention, sliding_attention)")
    if config.sliding_window is None:
        raise ArchError("HF config has sliding_attention layers but no sliding_window (use_sliding_window is false)")
    return Call("sliding", (("window", config.sliding_window),))


def arch_from_config(config: transformers.Qwen3Config) -> Arch:
    """The nanollm IR of a transformers Qwen3Config; ArchError for settings nanollm cannot express."""
    if config.model_type != "qwen3":
        raise ArchError(f"HF model_type {config.model_type!r} is not supported (only qwen3)")
    rope = config.rope_parameters or {}
    if config.attention_bias:
        raise ArchError("HF config has attention_bias = true; nanollm attention has no biases")
    if config.hidden_act != "silu":
        raise ArchError(f"HF hidden_act {config.hidden_act!r} is not supported (only silu, as SwiGLU)")
    if rope.get("rope_type") != "default":
        raise ArchError(f"HF rope_type {rope.get('rope_type')!r} is not supported (only default RoPE)")
    model_config = ModelConfig(
        vocab_size=config.vocab_size,
        d_model=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        d_ff=config.intermediate_size,
        norm_eps=float(config.rms_norm_eps),
        qk_norm=True,
        rope_theta=float(rope["rope_theta"]),
        tie_embeddings=bool(config.tie_word_embeddings),
    )
    ffn = Call("swiglu", (("d_ff", config.intermediate_size),))
    return Arch(model_config, tuple(Layer(mixer_call(t, config), ffn) for t in config.layer_types))


def weight_names(arch: Arch) -> dict[str, str]:
    """nanollm parameter name -> transformers parameter name."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not arch.config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(len(arch.layers)):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        names[ours + "mixer_norm.weight"] = theirs + "input_layernorm.weight"
        names[ours + "ffn_norm.weight"] = theirs + "post_attention_layernorm.weight"
        names.update({f"{ours}mixer.{p}.weight": f"{theirs}self_attn.{p}.weight" for p in ATTENTION})
        names.update({f"{ours}ffn.{p}.weight": f"{theirs}mlp.{p}.weight" for p in MLP})
    return names


def from_hf(model: transformers.PreTrainedModel | str | os.PathLike) -> fx.GraphModule:
    """A nanollm model carrying the weights of a transformers Qwen3ForCausalLM (or a local dir / hub id of one)."""
    if isinstance(model, (str, os.PathLike)):
        model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if type(model) is not transformers.Qwen3ForCausalLM:
        raise ArchError(f"from_hf supports transformers Qwen3ForCausalLM, not {type(model).__name__}")
    arch = arch_from_config(model.config)
    names = weight_names(arch)
    theirs = model.state_dict()
    unused = theirs.keys() - names.values() - ({"lm_head.weight"} if arch.config.tie_embeddings else set())
    if unused:
        raise ArchError(f"HF weights nanollm has no place for: {', '.join(sorted(unused))}")
    ours = Compiled(arch).build(device=model.device, dtype=model.dtype)
    ours.load_state_dict({name: theirs[hf_name] for name, hf_name in names.items()}, strict=True)
    return ours
