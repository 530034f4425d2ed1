"""from_hf: nanollm reproduces transformers Qwen3ForCausalLM logits, and archs/qwen3_0_6b.arch is Qwen3-0.6B."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

import nanollm
from nanollm import ArchError, Call
from nanollm.hf import arch_from_config

ARCH = Path(__file__).resolve().parents[1] / "archs" / "qwen3_0_6b.arch"
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=5e5,
)
QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6,
)


def tiny_hf(**overrides: Any) -> Qwen3ForCausalLM:
    """A random tiny Qwen3 on eager attention; norm scales randomised too, so a swapped norm mapping shows."""
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**{**TINY, **overrides}, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def assert_same_logits(hf: Qwen3ForCausalLM, ours: torch.nn.Module) -> None:
    """Logits within 1e-5 on random ids (batch 2, T 40), and the same greedy next token."""
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40))
    with torch.no_grad():
        expected = hf(ids).logits
        logits, aux_loss = ours(ids)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert torch.equal(logits[:, -1].argmax(-1), expected[:, -1].argmax(-1))
    assert aux_loss.item() == 0


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
    mixers = [layer.mixer for layer in arch_from_config(hf.config).layers]
    assert mixers == [Call("sliding", (("window", 8),)), Call("global"), Call("sliding", (("window", 8),))]
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
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
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
