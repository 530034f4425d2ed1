"""GPT-OSS from transformers: its MoE block and the whole GptOssForCausalLM (tiny, random, fp32, eager) to 1e-5, and the
published 20B and 120B configs imported with transformers' own parameter counts.

Every property the family has is live at the test size: sliding layers (window 8) shorter than the 40-token sequence,
YaRN past its 16-token original context (truncate false), sinks, attention biases, router and expert biases drawn away
from their zero init, expert pre-activations past the clamp limit, 3 of 8 experts per token. Each varied case also
checks that the property moves transformers' own logits.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from test_families import LENGTH, TINY, WINDOW, assert_changes, assert_same_logits, fresh, hf_logits, perturbed
from test_import import CONFIGS, imported
from transformers import GptOssConfig, GptOssForCausalLM
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

import nanollm
from nanollm.compiler import make_component
from nanollm.components import MATRIX, VECTOR, param_roles
from nanollm.components.ffn import dispatch
from nanollm.hf import arch_from_config, load_config, moe_call
from nanollm.ir import ModelConfig

YARN = {"rope_type": "yarn", "rope_theta": 1e3, "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0,
        "beta_slow": 1.0, "truncate": False}
GPT_OSS = dict(TINY, sliding_window=WINDOW, num_local_experts=8, num_experts_per_tok=3, swiglu_limit=1.5, rope_parameters=YARN,
               max_position_embeddings=64, eos_token_id=None, pad_token_id=None)
CASES = {
    "window_3": {"sliding_window": 3},
    "no_attention_bias": {"attention_bias": False},
    "top_1": {"num_experts_per_tok": 1},
    "limit_0.5": {"swiglu_limit": 0.5},
    "alpha_1": {"swiglu_alpha": 1.0},
    "full_and_sliding_swapped": {"layer_types": ["full_attention", "sliding_attention"] * 2},
}
PUBLISHED = ["gpt-oss-20b", "gpt-oss-120b"]


@torch.no_grad()
def drawn(model: torch.nn.Module) -> torch.nn.Module:
    """Sinks and every bias drawn well away from zero (transformers zero-initialises the expert biases), and expert
    weights large enough that the clamp at swiglu_limit bites."""
    for name, param in model.named_parameters():
        if name.endswith(("sinks", "bias")):
            param.normal_(0.0, 0.5)
        elif name.endswith("experts.gate_up_proj"):
            param.normal_(0.0, 0.3)
    return model


def gpt_oss(**overrides: Any) -> GptOssForCausalLM:
    """A tiny GptOssForCausalLM: sliding (window 8) and full layers alternating, YaRN, 8 experts, top 3."""
    torch.manual_seed(0)
    return perturbed(drawn(GptOssForCausalLM(GptOssConfig(**fresh(GPT_OSS, **overrides), attn_implementation="eager"))))


@functools.cache
def baseline() -> torch.Tensor:
    """transformers' logits of the unvaried tiny model, computed once."""
    return hf_logits(gpt_oss())


def test_gpt_oss_matches_hf():
    hf = gpt_oss()
    assert hf.config.layer_types[:2] == ["sliding_attention", "full_attention"] and hf.config.sliding_window < LENGTH
    assert_same_logits(hf)


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_gpt_oss_property_matches_hf(overrides: dict[str, Any]):
    assert_changes(assert_same_logits(gpt_oss(**overrides)), baseline())


@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_gpt_oss_moe_block_matches_hf_with_its_clamp_active(monkeypatch, path):
    """The MLP block alone, on both dispatch paths, values and the input's gradient; its weights load unchanged."""
    monkeypatch.setattr(dispatch, "use_grouped_mm", lambda rows: path == "grouped")
    hf_config = GptOssConfig(**fresh(GPT_OSS), attn_implementation="eager")
    torch.manual_seed(0)
    theirs = drawn(GptOssMLP(hf_config))
    with torch.no_grad():
        theirs.router.weight.normal_(0.0, 0.3)
        theirs.experts.down_proj.normal_(0.0, 0.1)
    config = ModelConfig(d_model=TINY["hidden_size"], d_ff=TINY["intermediate_size"])
    ours = make_component(moe_call(hf_config, config), config)
    state = theirs.state_dict()
    ours.load_state_dict({name: state[hf_name] for name, hf_name in ours.hf_weights().items()}, strict=False)
    assert set(ours.hf_weights().values()) == set(state)
    x = torch.randn(2, 11, TINY["hidden_size"], requires_grad=True)
    gate_up = x.detach().reshape(-1, x.shape[-1]) @ theirs.experts.gate_up_proj[0] + theirs.experts.gate_up_proj_bias[0]
    assert (gate_up[:, ::2] > hf_config.swiglu_limit).any() and (gate_up[:, 1::2].abs() > hf_config.swiglu_limit).any()
    expected, _ = theirs(x)
    actual, _ = ours(x)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    probe = torch.randn_like(expected)
    ours_dx, = torch.autograd.grad((actual * probe).sum(), x)
    theirs_dx, = torch.autograd.grad((expected * probe).sum(), x)
    torch.testing.assert_close(ours_dx, theirs_dx, atol=1e-5, rtol=0)


def test_gpt_oss_expert_and_router_biases_are_vectors_for_the_optimiser():
    hf_config = GptOssConfig(**fresh(GPT_OSS))
    config = ModelConfig(d_model=TINY["hidden_size"], d_ff=TINY["intermediate_size"])
    moe = make_component(moe_call(hf_config, config), config)
    assert param_roles(moe) == {"gate_up": MATRIX, "down": MATRIX, "gate_up_bias": VECTOR, "down_bias": VECTOR}
    assert param_roles(moe.router) == {"weight": MATRIX, "bias": VECTOR}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_gpt_oss_imports_with_transformers_parameter_count(name, tmp_path):
    hf = load_config(CONFIGS / f"{name}.config.json")
    compiled = nanollm.compile(imported(tmp_path, name))
    assert compiled.arch == arch_from_config(hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf)
    assert compiled.analysis.params_total == sum(p.numel() for p in model.parameters())
    experts = hf.num_local_experts
    inactive = hf.num_hidden_layers * (experts - hf.num_experts_per_tok) * (3 * 2880 * 2880 + 2 * 2880 + 2880)
    assert compiled.analysis.params_total - compiled.analysis.params_active == inactive


def test_shipped_gpt_oss_20b_file_is_the_imported_one(tmp_path):
    shipped = nanollm.compile(Path(__file__).parent.parent / "archs" / "gpt_oss_20b.arch")
    assert shipped.arch == nanollm.compile(imported(tmp_path, "gpt-oss-20b")).arch
