"""MiniMax-01 (MiniMax-Text-01): lightning-attention and softmax-attention layers (RoPE, no QK-norm; sliding where the config
has a sliding_window), a Mixtral MoE in every layer, and the scaled residual alpha norm(h) + beta f(norm(h)) with factors
per mixer kind and for the MoE."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..ir import Arch, Call, Layer
from . import Family, call, family, refuse
from .mixtral import moe_call
from .qwen3 import gqa_config


def decay_factor(layer: int, layers: int) -> float:
    """A lightning layer's factor on its decay rates, as MiniMax computes it: 1 - l / (L - 1), nudged off 0."""
    return 1 - layer / (layers - 1 + 1e-5) + 1e-5


def minimax(hf: Any) -> Arch:
    """MiniMaxForCausalLM."""
    config = gqa_config(hf, "none")
    sparse = moe_call(hf, config)
    mlp = dict(ffn_alpha=float(hf.mlp_alpha_factor), ffn_beta=float(hf.mlp_beta_factor))
    kinds = {
        "full_attention": Call("scaled", (("alpha", float(hf.full_attn_alpha_factor)), ("beta", float(hf.full_attn_beta_factor)))),
        "linear_attention": Call("scaled", (("alpha", float(hf.linear_attn_alpha_factor)), ("beta", float(hf.linear_attn_beta_factor)))),
    }
    residuals = {kind: call(scheme.name, "residual", config, **scheme.kwargs(), **mlp) for kind, scheme in kinds.items()}
    config = dataclasses.replace(config, residual=residuals["full_attention"])
    # a sliding_window makes every softmax layer a sliding one (transformers masks them all with it)
    softmax = call("global", "mixer", config) if hf.sliding_window is None else call("sliding", "mixer", config, window=hf.sliding_window)
    layers = []
    for i, layer_type in enumerate(hf.layer_types):
        refuse(layer_type not in residuals, f"MiniMax layer type {layer_type!r} is not supported (full_attention, linear_attention)")
        mixer = (softmax if layer_type == "full_attention" else
                 call("lightning", "mixer", config, decay=decay_factor(i, hf.num_hidden_layers), chunk=hf.block_size))
        layers.append(Layer((("mixer", mixer), ("ffn", sparse)), residuals[layer_type]))
    return Arch(config, tuple(layers))


def minimax_config(arch: Arch) -> Any:
    """A MiniMaxConfig of a model of lightning and global attention layers with softmax MoEs and scaled residuals, or None."""
    from transformers import MiniMaxConfig

    from . import common_fields, first_attention, rope_parameters

    kinds = {"global": "full_attention", "lightning": "linear_attention"}
    if not all(layer.mixer is not None and layer.mixer.name in kinds and layer.ffn is not None and layer.ffn.name == "moe"
               and layer.residual.name == "scaled" for layer in arch.layers) or first_attention(arch) is None:
        return None
    types = [kinds[layer.mixer.name] for layer in arch.layers]
    # each kind's residual factors from its first layer (the import checks that every layer has its kind's), the MoE's from any
    scaled = {kind: arch.layers[types.index(kind)].residual.kwargs() if kind in types else {"alpha": 1.0, "beta": 1.0} for kind in kinds.values()}
    mlp, moe = arch.layers[0].residual.kwargs(), arch.layers[0].ffn.kwargs()
    lightning = next((layer.mixer.kwargs() for layer in arch.layers if layer.mixer.name == "lightning"), {"chunk": 256})
    fields = common_fields(arch, moe["d_ff"])
    del fields["attention_bias"]  # MiniMax's attention has none, and no such field
    return MiniMaxConfig(**fields, layer_types=types, block_size=lightning["chunk"], rope_parameters=rope_parameters(first_attention(arch)["rope"]),
                         hidden_act="silu", sliding_window=None, num_local_experts=moe["experts"], num_experts_per_tok=moe["top"],
                         router_aux_loss_coef=moe["aux"], router_jitter_noise=moe["jitter"],
                         full_attn_alpha_factor=scaled["full_attention"]["alpha"], full_attn_beta_factor=scaled["full_attention"]["beta"],
                         linear_attn_alpha_factor=scaled["linear_attention"]["alpha"], linear_attn_beta_factor=scaled["linear_attention"]["beta"],
                         mlp_alpha_factor=mlp["ffn_alpha"], mlp_beta_factor=mlp["ffn_beta"], eos_token_id=None, bos_token_id=None, pad_token_id=None)


family("minimax", Family(("MiniMaxForCausalLM",), minimax, config_from_arch=minimax_config,
                         derived=(".slope_rate", ".query_decay", ".key_decay", ".diagonal_decay")))
