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


family("minimax", Family(("MiniMaxForCausalLM",), minimax, derived=(".slope_rate", ".query_decay", ".key_decay", ".diagonal_decay")))
