"""from_hf: nanollm reproduces transformers Qwen3, Qwen3-MoE and Mixtral logits; the shipped archs equal the real models."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import nanollm
from nanollm import ArchError
from nanollm.hf import arch_from_config

ARCHS = Path(__file__).resolve().parents[1] / "archs"
ARCH = ARCHS / "qwen3_0_6b.arch"
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=5e5,
)
QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6,
)


MOE_TINY = dict(TINY, num_hidden_layers=4, num_experts_per_tok=2)


def tiny_hf(model_class: type = Qwen3ForCausalLM, config_class: type = Qwen3Config, **overrides: Any) -> Any:
    """A random tiny model on eager attention (and eager experts); norm scales randomised too, so a swapped
    norm mapping shows, and router weights scaled up, so routing is decisive and a wrong expert shows."""
    torch.manual_seed(0)
    config = config_class(**{**TINY, **overrides}, attn_implementation="eager", experts_implementation="eager")
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            if name.endswith("mlp.gate.weight"):
                param.mul_(50)
    return model


def assert_same_logits(hf: Any, ours: torch.nn.Module) -> None:
    """Logits within 1e-5 on random ids (batch 2, T 40), and the same greedy next token."""
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40))
    with torch.no_grad():
        expected = hf(ids).logits
        logits, aux_loss = ours(ids)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert torch.equal(logits[:, -1].argmax(-1), expected[:, -1].argmax(-1))
    assert (aux_loss.item() > 0) == any(layer.ffn.name == "moe" for layer in arch_from_config(hf.config).layers)


def test_tied_embeddings() -> None:
    hf = tiny_hf(tie_word_embeddings=True)
    ours = nanollm.from_hf(hf)
    assert not hasattr(ours, "lm_head")
    assert_same_logits(hf, ours)


def test_untied_embeddings() -> None:
    hf = tiny_hf(tie_word_embeddings=False)
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    assert_same_logits(hf, nanollm.from_hf(hf))


def test_sliding_window_matches_hf() -> None:
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    hf = tiny_hf(layer_types=types, use_sliding_window=True, sliding_window=8)
    mixers = [(layer.mixer.name, layer.mixer.kwargs().get("window")) for layer in arch_from_config(hf.config).layers]
    assert mixers == [("sliding", 8), ("global", None), ("sliding", 8)]
    assert_same_logits(hf, nanollm.from_hf(hf))


def test_load_from_local_directory(tmp_path: Path) -> None:
    hf = tiny_hf()
    hf.save_pretrained(tmp_path)
    assert_same_logits(hf, nanollm.from_hf(str(tmp_path)))
    assert_same_logits(hf, nanollm.from_hf(tmp_path))


def test_qwen3_0_6b_arch_is_hf_qwen3_0_6b() -> None:
    config = Qwen3Config(**QWEN3_0_6B)
    with torch.device("meta"):
        hf = Qwen3ForCausalLM(config)
    compiled = nanollm.compile(ARCH)
    assert compiled.arch == arch_from_config(config)
    assert compiled.analysis.params_total == sum(p.numel() for p in hf.parameters())  # parameters() is deduplicated


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attention_bias=True), "attention_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
        (dict(layer_types=["sliding_attention"] * 3, sliding_window=8), "sliding_window"),  # use_sliding_window off
    ],
)
def test_unsupported_settings(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ArchError, match=message) as error:
        nanollm.from_hf(Qwen3ForCausalLM(Qwen3Config(**{**TINY, **overrides})))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Qwen3Model(Qwen3Config(**TINY)),
        lambda: LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4)),
    ],
    ids=["Qwen3Model", "LlamaForCausalLM"],
)
def test_unsupported_model_class(make: Any) -> None:
    with pytest.raises(ArchError, match="Qwen3ForCausalLM") as error:
        nanollm.from_hf(make())
    assert "\n" not in str(error.value)


# --- mixtures of experts ------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_topk", [True, False])
@pytest.mark.parametrize(
    "placement, sparse",
    [
        (dict(decoder_sparse_step=1, mlp_only_layers=[]), [True] * 4),
        (dict(decoder_sparse_step=2, mlp_only_layers=[]), [False, True, False, True]),
        (dict(decoder_sparse_step=1, mlp_only_layers=[0, 2]), [False, True, False, True]),
        (dict(decoder_sparse_step=2, mlp_only_layers=[3]), [False, True, False, False]),
    ],
)
def test_qwen3_moe_matches_hf(norm_topk: bool, placement: dict, sparse: list[bool]) -> None:
    hf = tiny_hf(
        Qwen3MoeForCausalLM, Qwen3MoeConfig, **MOE_TINY, **placement,
        num_experts=8, moe_intermediate_size=32, norm_topk_prob=norm_topk,
    )
    layers = arch_from_config(hf.config).layers
    assert [layer.ffn.name == "moe" for layer in layers] == sparse
    assert all(layer.ffn.kwargs()["norm_topk"] == norm_topk for layer in layers if layer.ffn.name == "moe")
    assert_same_logits(hf, nanollm.from_hf(hf))


def test_qwen3_moe_sliding_window_matches_hf() -> None:
    hf = tiny_hf(Qwen3MoeForCausalLM, Qwen3MoeConfig, **MOE_TINY, num_experts=4, moe_intermediate_size=32,
                 use_sliding_window=True, sliding_window=8)
    assert {(layer.mixer.name, layer.mixer.kwargs()["window"]) for layer in arch_from_config(hf.config).layers} == {("sliding", 8)}
    assert_same_logits(hf, nanollm.from_hf(hf))


@pytest.mark.parametrize("window", [8, None])
def test_mixtral_matches_hf(window: int | None) -> None:
    """Mixtral: no QK-norm, untied head, softmax top-2 of 4 experts, the same window on every layer (or none)."""
    hf = tiny_hf(MixtralForCausalLM, MixtralConfig, **MOE_TINY, num_local_experts=4, sliding_window=window)
    arch = arch_from_config(hf.config)
    assert arch.config.qk_norm == "none" and not arch.config.tie_embeddings
    assert {(layer.mixer.name, layer.mixer.kwargs().get("window")) for layer in arch.layers} == {("sliding", 8) if window else ("global", None)}
    assert_same_logits(hf, nanollm.from_hf(hf))


def test_load_moe_from_local_directory(tmp_path: Path) -> None:
    hf = tiny_hf(Qwen3MoeForCausalLM, Qwen3MoeConfig, **MOE_TINY, num_experts=4, moe_intermediate_size=32)
    hf.save_pretrained(tmp_path)
    assert_same_logits(hf, nanollm.from_hf(tmp_path))


@pytest.mark.parametrize(
    "path, model_class, config",
    [
        (
            "qwen3_30b_a3b.arch", Qwen3MoeForCausalLM,
            Qwen3MoeConfig(
                vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1e6,
                tie_word_embeddings=False, router_aux_loss_coef=0.001,
            ),
        ),
        (
            "mixtral_8x7b.arch", MixtralForCausalLM,
            MixtralConfig(
                vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False,
                router_aux_loss_coef=0.02,
            ),
        ),
    ],
)
def test_moe_archs_are_the_hf_models(path: str, model_class: type, config: Any) -> None:
    with torch.device("meta"):
        hf = model_class(config)
    compiled = nanollm.compile(ARCHS / path)
    assert compiled.arch == arch_from_config(config)
    assert compiled.analysis.params_total == sum(p.numel() for p in hf.parameters())
