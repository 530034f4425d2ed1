"""Import a transformers model: its config -> the nanollm IR, its weights -> the compiled model.

Whole models: Qwen3ForCausalLM, Qwen3MoeForCausalLM and MixtralForCausalLM. DeepseekV3's MoE layer maps
onto `moe` too (`moe_call`, `ffn_weight_names`), but its attention (MLA) has no nanollm counterpart yet.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import transformers
from torch import fx

from . import Compiled
from .components import REGISTRY
from .errors import ArchError
from .ir import Arch, Call, Layer, ModelConfig

CAUSAL_LMS = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
QK_NORMS = ("q_norm", "k_norm")
MLP = ("gate_proj", "up_proj", "down_proj")


def component_call(name: str, config: ModelConfig, **args: Any) -> Call:
    """A resolved call of a registered component: the given arguments, defaults for the rest, checked."""
    spec = REGISTRY[name]
    values = {p.name: args[p.name] if p.name in args else p.default_for(config) for p in spec.params}
    problem = spec.module.check(config, **values)
    if problem:
        raise ArchError(f"HF config maps to {name} arguments nanollm refuses: {problem}")
    return Call(name, tuple(values.items()))


def moe_call(hf: transformers.PretrainedConfig, config: ModelConfig) -> Call:
    """The `moe` call of a Qwen3-MoE, Mixtral or DeepSeek-V3 sparse layer."""
    if hf.model_type == "qwen3_moe":
        return component_call(
            "moe", config, top=hf.num_experts_per_tok, experts=hf.num_experts, d_ff=hf.moe_intermediate_size,
            norm_topk=bool(hf.norm_topk_prob), aux=float(hf.router_aux_loss_coef),
        )
    if hf.model_type == "mixtral":  # softmax top-k, always renormalised
        return component_call(
            "moe", config, top=hf.num_experts_per_tok, experts=hf.num_local_experts, d_ff=hf.intermediate_size,
            aux=float(hf.router_aux_loss_coef), jitter=float(hf.router_jitter_noise),
        )
    if hf.model_type == "deepseek_v3":  # sigmoid scores, group-limited top-k, score-correction bias, shared experts
        return component_call(
            "moe", config, top=hf.num_experts_per_tok, experts=hf.n_routed_experts, d_ff=hf.moe_intermediate_size,
            shared=hf.n_shared_experts, router="sigmoid", norm_topk=bool(hf.norm_topk_prob),
            scale=float(hf.routed_scaling_factor), groups=hf.n_group, top_groups=hf.topk_group, balance="bias",
        )
    raise ArchError(f"HF model_type {hf.model_type!r} has no MoE layer nanollm knows")


def is_sparse(hf: transformers.PretrainedConfig, index: int) -> bool:
    """Whether layer `index` of a Qwen3-MoE, Mixtral or DeepSeek-V3 config is an MoE layer."""
    if hf.model_type == "qwen3_moe":
        return index not in hf.mlp_only_layers and hf.num_experts > 0 and (index + 1) % hf.decoder_sparse_step == 0
    if hf.model_type == "deepseek_v3":
        return index >= hf.first_k_dense_replace
    return hf.model_type == "mixtral"


def mixer_call(hf: transformers.PretrainedConfig, index: int) -> Call:
    """The nanollm mixer of layer `index`: Qwen3 lists layer_types; Qwen3-MoE and Mixtral slide on every layer or none."""
    layer_types = getattr(hf, "layer_types", None)
    if layer_types:
        layer_type = layer_types[index]
    else:
        layer_type = "full_attention" if hf.sliding_window is None else "sliding_attention"
    if layer_type == "full_attention":
        return Call("global")
    if layer_type != "sliding_attention":
        raise ArchError(f"HF layer type {layer_type!r} is not supported (only full_attention, sliding_attention)")
    if hf.sliding_window is None:
        raise ArchError("HF config has sliding_attention layers but no sliding_window (use_sliding_window is false)")
    return Call("sliding", (("window", hf.sliding_window),))


def arch_from_config(hf: transformers.PretrainedConfig) -> Arch:
    """The nanollm IR of a transformers Qwen3, Qwen3-MoE or Mixtral config; ArchError for what nanollm cannot express."""
    if hf.model_type == "deepseek_v3":
        raise ArchError("HF DeepseekV3 uses multi-head latent attention (MLA), which nanollm does not have yet")
    if hf.model_type not in CAUSAL_LMS:
        raise ArchError(f"HF model_type {hf.model_type!r} is not supported (from_hf takes {', '.join(CAUSAL_LMS.values())})")
    rope = hf.rope_parameters or {}
    if getattr(hf, "attention_bias", False):
        raise ArchError("HF config has attention_bias = true; nanollm attention has no biases")
    if hf.hidden_act != "silu":
        raise ArchError(f"HF hidden_act {hf.hidden_act!r} is not supported (only silu, as SwiGLU)")
    if rope.get("rope_type") != "default":
        raise ArchError(f"HF rope_type {rope.get('rope_type')!r} is not supported (only default RoPE)")
    config = ModelConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        d_ff=hf.intermediate_size,
        norm_eps=float(hf.rms_norm_eps),
        qk_norm=hf.model_type != "mixtral",
        rope_theta=float(rope["rope_theta"]),
        tie_embeddings=bool(hf.tie_word_embeddings),
    )
    dense = Call("swiglu", (("d_ff", hf.intermediate_size),))
    sparse = moe_call(hf, config) if hf.model_type != "qwen3" else None
    layers = (Layer(mixer_call(hf, i), sparse if is_sparse(hf, i) else dense) for i in range(hf.num_hidden_layers))
    return Arch(config, tuple(layers))


def ffn_weight_names(ffn: Call, ours: str, theirs: str) -> dict[str, str]:
    """nanollm -> transformers parameter names of one FFN, under the given module prefixes."""
    if ffn.name == "swiglu":
        return {f"{ours}{p}.weight": f"{theirs}{p}.weight" for p in MLP}
    names = {
        f"{ours}router.weight": f"{theirs}gate.weight",
        f"{ours}gate_up": f"{theirs}experts.gate_up_proj",  # both (E, 2 * d_ff, d_model), gate rows first
        f"{ours}down": f"{theirs}experts.down_proj",
    }
    args = ffn.kwargs()
    if args["balance"] == "bias":
        names[f"{ours}selection_bias"] = f"{theirs}gate.e_score_correction_bias"
    if args["shared"]:
        names.update({f"{ours}shared_experts.{p}.weight": f"{theirs}shared_experts.{p}.weight" for p in MLP})
    return names


def weight_names(arch: Arch) -> dict[str, str]:
    """nanollm parameter (and persistent buffer) name -> transformers name."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not arch.config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    attention = PROJECTIONS + (QK_NORMS if arch.config.qk_norm else ())
    for i, layer in enumerate(arch.layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        names[ours + "mixer_norm.weight"] = theirs + "input_layernorm.weight"
        names[ours + "ffn_norm.weight"] = theirs + "post_attention_layernorm.weight"
        names.update({f"{ours}mixer.{p}.weight": f"{theirs}self_attn.{p}.weight" for p in attention})
        names.update(ffn_weight_names(layer.ffn, ours + "ffn.", theirs + "mlp."))
    return names


def from_hf(model: transformers.PreTrainedModel | str | os.PathLike) -> fx.GraphModule:
    """A nanollm model carrying the weights of a transformers Qwen3, Qwen3-MoE or Mixtral causal LM (or a local dir / hub id of one)."""
    if isinstance(model, (str, os.PathLike)):
        arch = arch_from_config(transformers.AutoConfig.from_pretrained(model))  # refuse before loading any weight
        model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    else:
        arch = arch_from_config(model.config)
    if type(model) is not getattr(transformers, CAUSAL_LMS[model.config.model_type]):
        raise ArchError(f"from_hf takes a causal LM ({', '.join(CAUSAL_LMS.values())}), not {type(model).__name__}")
    names = weight_names(arch)
    theirs = model.state_dict()
    unused = theirs.keys() - names.values() - ({"lm_head.weight"} if arch.config.tie_embeddings else set())
    if unused:
        raise ArchError(f"HF weights nanollm has no place for: {', '.join(sorted(unused))}")
    ours = Compiled(arch).build(device=model.device, dtype=model.dtype)
    ours.load_state_dict({name: theirs[hf_name] for name, hf_name in names.items()}, strict=True)
    return ours
