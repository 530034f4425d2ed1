"""DeepSeek-V4: compressed attention on every layer (`compressed`: a sliding window of one K = V head with sinks, plus
CSA's indexed overlapping entries or HCA's heavy ones, per `layer_types`)."""
from __future__ import annotations

from typing import Any

from ..ir import Call, ModelConfig
from . import call, refuse, rope_call

LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")


def position_call(hf: Any, config: ModelConfig, label: str) -> Call:
    """The position encoding of one of V4's rope types (`main` or `compress`): partial, on the last dimensions, interleaved."""
    rope = rope_call(hf.rope_parameters[label], config, partial=True)
    return call(rope.name, "position", config, **{**rope.kwargs(), "placement": "last", "interleaved": True})


def attention_call(hf: Any, config: ModelConfig, layer_type: str) -> Call:
    """The `compressed` call of one V4 layer type: the window alone, CSA (overlapping, indexed) or HCA (every ended entry)."""
    refuse(layer_type not in LAYER_TYPES, f"DeepSeek-V4 layer type {layer_type!r} is not one nanollm knows ({', '.join(LAYER_TYPES)})")
    refuse(hf.num_key_value_heads != 1, f"num_key_value_heads = {hf.num_key_value_heads}: DeepSeek-V4 attention has one K = V head")
    refuse(bool(hf.attention_bias), "the transformers config has attention_bias = true; DeepSeek-V4 attention has no biases")
    sparse = layer_type == "compressed_sparse_attention"
    rate = hf.compress_rates.get(layer_type, 0)
    return call("compressed", "mixer", config, window=hf.sliding_window, rate=rate, overlap=sparse, topk=hf.index_topk if sparse else 0,
                index_heads=hf.index_n_heads, index_head_dim=hf.index_head_dim, heads=hf.num_attention_heads, head_dim=hf.head_dim,
                q_lora_rank=hf.q_lora_rank, o_groups=hf.o_groups, o_lora_rank=hf.o_lora_rank, scale=hf.head_dim ** -0.5,
                rope=position_call(hf, config, "main" if layer_type == "sliding_attention" else "compress"))
