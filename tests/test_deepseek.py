"""DeepSeek-V3 from transformers: whole tiny models to 1e-5 (MLA with and without a query latent, interleaved and
half-split RoPE, YaRN with its mscale, dense layers then the MoE), and the published config's .arch and parameter count."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import transformers
from test_families import assert_same_logits, hf_logits, tiny
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV32Config, DeepseekV32ForCausalLM

import nanollm
from nanollm import ArchError
from nanollm.cli import main
from nanollm.hf import arch_from_config, load_config

CONFIGS = Path(__file__).parent / "fixtures" / "hf_configs"
DEEPSEEK = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
                routed_scaling_factor=2.5, initializer_range=0.1, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24,
                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, experts_implementation="eager",
                rope_parameters={"rope_type": "default", "rope_theta": 1e3})
YARN = {"rope_type": "yarn", "rope_theta": 1e3, "factor": 8.0, "original_max_position_embeddings": 16, "mscale": 0.8,
        "mscale_all_dim": 1.0, "beta_fast": 4.0, "beta_slow": 1.0}


def deepseek_v3(**overrides) -> DeepseekV3ForCausalLM:
    """A tiny DeepseekV3ForCausalLM, norms perturbed, the routers' correction biases large enough to change choices."""
    model = tiny(DeepseekV3ForCausalLM, DeepseekV3Config, DEEPSEEK, **overrides)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(std=0.3)
    return model


@functools.cache
def baseline() -> torch.Tensor:
    """transformers' logits of the unvaried tiny model."""
    return hf_logits(deepseek_v3())


CASES = {
    "q-latent": {},
    "q-direct": {"q_lora_rank": None},
    "half-split-rope": {"rope_interleave": False},
    "yarn-mscale": {"rope_parameters": YARN},
    "two-dense-layers": {"first_k_dense_replace": 2, "norm_topk_prob": False},
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_deepseek_v3_matches_hf(overrides):
    hf = deepseek_v3(**overrides)
    arch = arch_from_config(hf.config)
    dense = overrides.get("first_k_dense_replace", 1)
    assert [layer.ffn.name for layer in arch.layers] == ["swiglu"] * dense + ["moe"] * (3 - dense)
    assert {layer.mixer.name for layer in arch.layers} == {"mla"}
    expected = assert_same_logits(hf)
    if overrides:  # the property changed transformers' own logits
        assert (expected - baseline()).abs().max() > 1e-2


@pytest.mark.parametrize("overrides, message", [
    ({"num_key_value_heads": 2}, "num_key_value_heads = 2"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_deepseek_v3_configs_nanollm_cannot_reproduce_are_refused(overrides, message):
    with pytest.raises(ArchError, match=message):
        arch_from_config(DeepseekV3Config(**{**DEEPSEEK, **overrides}))


def test_deepseek_v3_import_has_transformers_parameter_count_and_a_576_element_cache(tmp_path):
    """The published config: 671B parameters as transformers' meta model counts them, ~37B active, 576 cached per layer."""
    out = tmp_path / "deepseek_v3.arch"
    assert main(["import", str(CONFIGS / "deepseek-v3.config.json"), "-o", str(out)]) == 0
    hf = load_config(CONFIGS / "deepseek-v3.config.json")
    compiled = nanollm.compile(out)
    assert compiled.arch == arch_from_config(hf)
    assert out.read_text().split("\n\n", 1)[1] == (Path(__file__).parent.parent / "archs/deepseek_v3.arch").read_text().split("\n\n", 1)[1]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf)
    analysis = compiled.analysis
    assert analysis.params_total == sum(p.numel() for p in model.parameters()) == 671_026_404_352
    # active: embeddings, attention, norms, 3 dense layers, and per MoE layer the router, the shared and 8 routed experts
    expert = 3 * 7168 * 2048
    assert analysis.params_active == analysis.params_total - 58 * (256 - 8) * expert
    assert analysis.cache_bytes_per_token == 61 * (512 + 64) * 2


# --- DeepSeek-V3.2: DSA -------------------------------------------------------------------------------------

DEEPSEEK_V32 = dict({k: v for k, v in DEEPSEEK.items() if k != "experts_implementation"}, experts_implementation="eager",
                    index_topk=7, index_n_heads=8, index_head_dim=16)


def deepseek_v32(**overrides) -> DeepseekV32ForCausalLM:
    """A tiny DeepseekV32ForCausalLM: the indexer keeps 7 of up to 40 keys; norms perturbed, routers' biases drawn."""
    model = tiny(DeepseekV32ForCausalLM, DeepseekV32Config, DEEPSEEK_V32, **overrides)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(std=0.3)
        for name, param in model.named_parameters():
            if "indexer.k_norm" in name:
                param.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("overrides", [{}, {"rope_parameters": YARN, "index_topk": 20}], ids=["topk-7", "yarn-topk-20"])
def test_deepseek_v32_matches_hf_with_selection_shorter_than_the_sequence(overrides):
    hf = deepseek_v32(**overrides)
    arch = arch_from_config(hf.config)
    assert {(layer.mixer.name, layer.mixer.kwargs()["topk"]) for layer in arch.layers} == {("dsa", overrides.get("index_topk", 7))}
    expected = assert_same_logits(hf)
    everything = deepseek_v32(**{**overrides, "index_topk": 64})  # the same weights, every key kept
    assert (expected - hf_logits(everything)).abs().max() > 1e-2  # so the selection mattered
