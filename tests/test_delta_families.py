"""from_hf reproduces transformers' Qwen3-Next, Qwen3.5 (text), OLMo-hybrid and Kimi-Linear logits (delta-rule hybrids), one
property varied per case, on 70 tokens (past transformers' chunk of 64); the published Qwen3-Next-80B-A3B config
imports to a file whose parameter count is transformers' own."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import (
    KimiLinearConfig,
    KimiLinearForCausalLM,
    OlmoHybridConfig,
    OlmoHybridForCausalLM,
    Qwen3_5ForCausalLM,
    Qwen3_5TextConfig,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

import nanollm
from nanollm.cli import main
from nanollm.hf import arch_from_config, from_hf, load_config

CONFIGS = Path(__file__).parent / "fixtures" / "hf_configs"
LINEAR = {"linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 6,
          "linear_conv_kernel_dim": 4}
TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, **LINEAR}
MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
       "decoder_sparse_step": 2}


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode; every vector (norm scales, A_log, dt_bias) drawn at random so that none sits at its initial value."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() < 2 or "A_log" in name:
                parameter.uniform_(-0.5, 0.5)
    return model.eval()


def assert_same_logits(model_class: type, config_class: type, settings: dict[str, Any]) -> None:
    """A tiny random transformers model of `settings` and its from_hf copy give the same logits on 70 tokens."""
    torch.manual_seed(0)
    hf = randomized(model_class(config_class(**settings, attn_implementation="eager")))
    ours = from_hf(hf)
    tokens = torch.randint(0, settings["vocab_size"], (2, 70))
    with torch.no_grad():
        theirs, mine = hf(tokens).logits, ours(tokens)
    torch.testing.assert_close(mine[0] if isinstance(mine, tuple) else mine, theirs, atol=1e-5, rtol=0)


QWEN3_NEXT = {
    "base": {},  # MoE on every second layer, one gated shared expert of two experts' width, partial RoPE 0.25
    "moe_everywhere_but_layer_0": {"decoder_sparse_step": 1, "mlp_only_layers": [0]},
    "unnormalised_top_k": {"norm_topk_prob": False, "num_experts_per_tok": 3},
    "half_rotary": {"partial_rotary_factor": 0.5},
    "key_heads_equal_value_heads": {"linear_num_key_heads": 4},
    "attention_first": {"layer_types": ["full_attention", "linear_attention", "linear_attention", "full_attention"]},
}


@pytest.mark.parametrize("overrides", QWEN3_NEXT.values(), ids=QWEN3_NEXT.keys())
def test_qwen3_next_matches_hf(overrides: dict[str, Any]) -> None:
    assert_same_logits(Qwen3NextForCausalLM, Qwen3NextConfig, {**TINY, **MOE, **overrides})


@pytest.mark.parametrize("overrides", [{}, {"partial_rotary_factor": 0.5, "tie_word_embeddings": True}], ids=["base", "half_rotary_tied"])
def test_qwen3_5_text_matches_hf(overrides: dict[str, Any]) -> None:
    assert_same_logits(Qwen3_5ForCausalLM, Qwen3_5TextConfig, {**TINY, **overrides})


OLMO_HYBRID = {
    "base": {},  # beta in (0, 2), RoPE on the attention layers
    "beta_below_one": {"linear_allow_neg_eigval": False},
    "nope": {"rope_parameters": {"rope_type": "default", "rope_theta": None}},
}


@pytest.mark.parametrize("overrides", OLMO_HYBRID.values(), ids=OLMO_HYBRID.keys())
def test_olmo_hybrid_matches_hf(overrides: dict[str, Any]) -> None:
    assert_same_logits(OlmoHybridForCausalLM, OlmoHybridConfig, {**TINY, "eos_token_id": None, "pad_token_id": None, **overrides})


KIMI = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
        "v_head_dim": 12, "num_local_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
        "rms_norm_eps": 1e-5, "first_k_dense_replace": 1, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
        "linear_attn_config": {"num_heads": 4, "head_dim": 8, "short_conv_kernel_size": 4, "kda_layers": [1, 2, 4], "full_attn_layers": [3]}}
KIMI_CASES = {
    "base": {},  # KDA, NoPE MLA with latent norms at 1e-6 beside rms_norm_eps 1e-5, group-limited sigmoid MoE after a dense layer
    "query_latent_two_shared": {"q_lora_rank": 24, "n_shared_experts": 2, "first_k_dense_replace": 2},
}


@pytest.mark.parametrize("overrides", KIMI_CASES.values(), ids=KIMI_CASES.keys())
def test_kimi_linear_matches_hf(overrides: dict[str, Any]) -> None:
    assert_same_logits(KimiLinearForCausalLM, KimiLinearConfig, {**KIMI, **overrides})


def test_qwen3_next_80b_imports_to_a_file_with_transformers_parameter_count(tmp_path: Path) -> None:
    config = CONFIGS / "qwen3-next-80b-a3b.config.json"
    out = tmp_path / "qwen3_next.arch"
    assert main(["import", str(config), "-o", str(out)]) == 0
    hf = load_config(config)
    compiled = nanollm.compile(out)
    assert compiled.arch == arch_from_config(hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf)
    assert compiled.analysis.params_total == sum(p.numel() for p in model.parameters()) == 79_674_391_296
