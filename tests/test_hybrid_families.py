"""from_hf reproduces transformers' LFM2, Nemotron-H and MiniMax logits (fp32, eager, tiny random configs), one property
varied per case; each varied case also moves transformers' own logits, so no case passes because a property did nothing."""
from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from transformers import (
    Lfm2Config,
    Lfm2ForCausalLM,
    MiniMaxConfig,
    MiniMaxForCausalLM,
    NemotronHConfig,
    NemotronHForCausalLM,
)

from test_families import assert_changes, assert_same_logits, fresh, hf_logits, perturbed

import nanollm
from nanollm import ArchError
from nanollm.hf import arch_from_config
from nanollm.source import arch_source

TINY = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
LFM2 = dict(TINY, intermediate_size=128, num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "conv"], block_multiple_of=32)
# chunk 16 does not divide the 40 test tokens; two groups of four Mamba heads
NEMOTRON_H = dict(TINY, head_dim=16, intermediate_size=96, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=16, n_groups=2,
                  chunk_size=16, layers_block_type=["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"])
# blocks of 16 tokens; every alpha and beta away from 1; two of four experts per token
MINIMAX = dict(TINY, head_dim=16, intermediate_size=64, num_hidden_layers=4, block_size=16, num_local_experts=4, num_experts_per_tok=2,
               layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"], full_attn_alpha_factor=1.5,
               full_attn_beta_factor=0.7, linear_attn_alpha_factor=0.9, linear_attn_beta_factor=1.2, mlp_alpha_factor=1.1,
               mlp_beta_factor=0.8)
FAMILIES = {
    "lfm2": (Lfm2ForCausalLM, Lfm2Config, LFM2),
    "nemotron_h": (NemotronHForCausalLM, NemotronHConfig, NEMOTRON_H),
    "minimax": (MiniMaxForCausalLM, MiniMaxConfig, MINIMAX),
}


def tiny(family: str, **overrides: Any) -> Any:
    """A tiny random transformers model of a family with `overrides`, eager attention, norms perturbed, biases random."""
    model_class, config_class, base = FAMILIES[family]
    torch.manual_seed(0)
    model = perturbed(model_class(config_class(**fresh(base, **overrides), attn_implementation="eager")))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias") or name.endswith(".D") or name.endswith(".dt_bias"):  # initialised to constants
                parameter.normal_(0, 0.5)
    return model


@functools.cache
def baseline(family: str) -> torch.Tensor:
    """transformers' logits of a family's unvaried tiny model."""
    return hf_logits(tiny(family))


CASES = [  # family, overrides, whether they change the model (a chunk size changes only the order of the sums)
    ("lfm2", {}, False),
    ("lfm2", dict(conv_bias=True), True),
    ("lfm2", dict(conv_L_cache=4), True),
    ("lfm2", dict(block_auto_adjust_ff_dim=False, tie_word_embeddings=False), True),
    ("nemotron_h", {}, False),
    ("nemotron_h", dict(chunk_size=7), False),
    ("nemotron_h", dict(n_groups=1), True),
    ("nemotron_h", dict(use_conv_bias=False, use_bias=True, mlp_bias=True), True),
    ("nemotron_h", dict(time_step_min=0.3, conv_kernel=3), True),
    ("minimax", {}, False),
    ("minimax", dict(block_size=7), False),
    ("minimax", dict(layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"]), True),
]


@pytest.mark.parametrize("family, overrides, changes", CASES, ids=[f"{f}-{'-'.join(o) or 'base'}" for f, o, _ in CASES])
def test_hybrid_family_logits_equal_transformers(family: str, overrides: dict[str, Any], changes: bool) -> None:
    logits = assert_same_logits(tiny(family, **overrides))
    if changes:
        assert_changes(logits, baseline(family))


def test_minimax_sliding_window_equals_transformers_and_moves_its_logits() -> None:
    logits = assert_same_logits(tiny("minimax", sliding_window=3))  # far shorter than the 40 test tokens
    assert (logits - baseline("minimax")).abs().max() > 1e-3  # 100 times the tolerance: tiny random attention is nearly uniform


# Nemotron 3's MoE blocks: four squared-ReLU experts in two groups, two per token from the best group, renormalised and
# scaled; one shared expert twice an expert's width
NEMOTRON_H_MOE = dict(layers_block_type=["linear_attention", "moe", "full_attention", "moe"], n_routed_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, moe_shared_expert_intermediate_size=64, n_group=2, topk_group=1, routed_scaling_factor=2.5)


def test_nemotron_h_moe_blocks_equal_transformers_with_their_score_correction_bias() -> None:
    model = tiny("nemotron_h", **NEMOTRON_H_MOE)
    unbiased = hf_logits(model)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zeros in a fresh model; it only chooses experts, never weighs them
                buffer.normal_(0, 0.2)
    assert_changes(assert_same_logits(model), unbiased)
    arch = arch_from_config(model.config)
    assert nanollm.compile(arch_source(arch, "nemotron_h")).arch == arch


@pytest.mark.parametrize("overrides, message", [
    (dict(moe_latent_size=32), "moe_latent_size"),
    (dict(moe_shared_expert_intermediate_size=48), "not a multiple of moe_intermediate_size"),
])
def test_nemotron_h_moe_configurations_nanollm_cannot_express_are_refused_by_name(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ArchError, match=message):
        arch_from_config(NemotronHConfig(**fresh(NEMOTRON_H, **{**NEMOTRON_H_MOE, **overrides})))


@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid_family_arch_source_compiles_back_to_the_same_ir(family: str) -> None:
    _, config_class, base = FAMILIES[family]
    arch = arch_from_config(config_class(**fresh(base)))
    assert nanollm.compile(arch_source(arch, family)).arch == arch
