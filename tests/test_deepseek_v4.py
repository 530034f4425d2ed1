"""DeepSeek-V4 from transformers: its attention layer by layer type against DeepseekV4Attention (window, CSA, HCA) at 1e-5,
the pieces of the compressed branch by their equations, the accounting by closed forms, and bad arguments."""
from __future__ import annotations

import copy

import pytest
import torch
from test_components import CONFIG, build, close, mix
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention, DeepseekV4RotaryEmbedding

import nanollm
from nanollm.compiler import make_table
from nanollm.components.attention.compressed import visible_entries
from nanollm.components.norm.rmsnorm import RMSNorm
from nanollm.hf.deepseek_v4 import LAYER_TYPES, attention_call
from nanollm.ir import ModelConfig

LENGTH = 24  # past the window (5), past both rates (2 and 8): 12 CSA entries and 3 HCA ones, more CSA ones than topk (3)
# Tiny V4 settings: half of each 16-wide head rotates (the last 8 dimensions); the compressed layers' RoPE is YaRN over a
# 16-token original context at another base, as DeepSeek-V4's.
V4 = dict(vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
          head_dim=16, q_lora_rank=24, partial_rotary_factor=0.5, sliding_window=5, o_groups=2, o_lora_rank=12, index_n_heads=8,
          index_head_dim=16, index_topk=3, rope_theta=1e3, compress_rope_theta=4e4, layer_types=list(LAYER_TYPES),
          compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 8}, rms_norm_eps=1e-6,
          rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, n_routed_experts=4,
          num_experts_per_tok=2)


def v4_config(**overrides) -> DeepseekV4Config:
    """The tiny DeepseekV4Config, eager attention."""
    return DeepseekV4Config(**copy.deepcopy({**V4, **overrides}), attn_implementation="eager")


def settings(hf: DeepseekV4Config) -> ModelConfig:
    """nanollm's model settings of the tiny config (widths and the norm epsilon)."""
    return ModelConfig(vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_heads=hf.num_attention_heads, n_kv_heads=1, head_dim=hf.head_dim,
                       norm_eps=hf.rms_norm_eps, seq_len=64)


def pair(layer_type: str, **overrides) -> tuple[torch.nn.Module, DeepseekV4Attention, DeepseekV4RotaryEmbedding]:
    """Our `compressed` attention of a layer type, random (sinks and position biases too), and transformers' with its weights."""
    hf = v4_config(**overrides)
    config = settings(hf)
    ours = build("compressed", config, **attention_call(hf, config, layer_type).kwargs())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.endswith(("sinks", "position_bias")):
                param.normal_(std=1.0)
    theirs = DeepseekV4Attention(hf, LAYER_TYPES.index(layer_type)).eval()
    mine = ours.state_dict()
    theirs.load_state_dict({hf_name: mine[name] for name, hf_name in ours.hf_weights().items()}, strict=True)
    return ours, theirs, DeepseekV4RotaryEmbedding(hf)


def sliding_mask(length: int, window: int) -> torch.Tensor:
    """The additive (1, 1, T, T) mask transformers' eager attention takes: query i sees key j iff i - window < j <= i."""
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    return torch.zeros(length, length).masked_fill(~((j <= i) & (i - j < window)), float("-inf"))[None, None]


@torch.no_grad()
def hf_attention(theirs: DeepseekV4Attention, rotary: DeepseekV4RotaryEmbedding, x: torch.Tensor) -> torch.Tensor:
    """transformers' attention output on x, no cache: its rope types' tables and the sliding mask, as DeepseekV4Model passes them."""
    batch, length, _ = x.shape
    positions = torch.arange(length)[None].expand(batch, -1)
    tables = {label: rotary(x, positions, layer_type=label) for label in ("main", "compress")}
    mask = sliding_mask(length, theirs.sliding_window).expand(batch, -1, -1, -1)
    out, _ = theirs(x, position_embeddings=tables, position_ids=positions, attention_mask=mask)
    return out


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_compressed_attention_matches_transformers_per_layer_type(layer_type):
    """Every layer type of DeepseekV4Attention: the window with sinks, K = V and inverse RoPE; CSA; HCA; to 1e-5."""
    torch.manual_seed(0)
    ours, theirs, rotary = pair(layer_type)
    x = torch.randn(2, LENGTH, 64)
    expected = hf_attention(theirs, rotary, x)
    close(mix(ours, x), expected)
    if ours.compressor is not None:  # the compressed entries changed the output: dropping them does not match
        ours.compressor, ours.indexer = None, None
        assert (mix(ours, x) - expected).abs().max() > 1e-2
