"""Attention sinks (GPT-OSS): a learned logit per head in every softmax, taking mass without a value.

References: transformers' GptOssAttention (eager, with its own sliding mask), and the softmax with the sink as one
more column written out (`attend_eager`), which the fast SDPA form and the flex form must equal, gradients included.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_analysis import TINY
from test_components import CONFIG, build, close, mix
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, GptOssRotaryEmbedding

import nanollm
from nanollm.components import VECTOR, param_roles
from nanollm.components.attention.causal import attend_eager, attend_flex, attend_with_sink, causal_mask


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def perturbed(module):
    """Sinks and biases away from their zero init, so that a dropped one cannot pass."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name == "sinks" or name.endswith("bias"):
                param.normal_(0.0, 1.0)
    return module


@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_sink_attention_matches_gpt_oss_attention(window, kv_heads):
    config = dataclasses.replace(CONFIG, n_kv_heads=kv_heads, qk_norm="none")
    ours = perturbed(build("sliding" if window else "global", config, sinks=True, bias=True, **({"window": window} if window else {})))
    hf = GptOssConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=1, num_attention_heads=config.n_heads,
        num_key_value_heads=kv_heads, head_dim=config.head_dim, sliding_window=window or 4096, attention_bias=True,
        layer_types=["sliding_attention" if window else "full_attention"], num_local_experts=4, intermediate_size=32,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, attn_implementation="eager",
    )
    theirs = GptOssAttention(hf, 0).eval()
    theirs.load_state_dict(ours.state_dict())  # strict: projections, their biases and the sinks
    batch, length = 2, 13
    x = torch.randn(batch, length, config.d_model)
    rope = GptOssRotaryEmbedding(hf)(x, torch.arange(length).expand(batch, length))
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    visible = (k <= q) & (q - k < (window or length))
    mask = torch.zeros(length, length).masked_fill(~visible, float("-inf")).expand(batch, 1, length, length)
    expected, _ = theirs(x, position_embeddings=rope, attention_mask=mask)
    close(mix(ours, x), expected)


@pytest.mark.parametrize("window", [None, 1, 4, 40], ids=["full", "window1", "window4", "window40"])
def test_sink_on_sdpa_equals_the_written_out_softmax_with_gradients(window):
    q = torch.randn(2, 4, 37, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 37, 16, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, requires_grad=True)
    fast = attend_with_sink(q, k, v, window, None, sinks)
    slow = attend_eager(q, k, v, causal_mask(q.shape[-2], window, q.device), None, 0.0, sinks)
    close(fast, slow)
    upstream = torch.randn_like(slow)
    expected = torch.autograd.grad(slow, (q, k, v, sinks), upstream)
    for ours, reference in zip(torch.autograd.grad(fast, (q, k, v, sinks), upstream), expected):
        close(ours, reference)


def test_sinks_on_flex_attention_equal_the_written_out_softmax():
    """The GPU path (flex_attention's output rescaled by its log-sum-exp), forward on CPU: 300 positions span three blocks."""
    q, k, v = torch.randn(1, 4, 300, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    sinks = torch.randn(4) * 3
    with torch.no_grad():
        for window, softcap in ((None, 0.0), (7, 0.0), (130, 20.0)):
            close(attend_flex(q, k, v, window, None, softcap, sinks), attend_eager(q, k, v, causal_mask(q.shape[-2], window, q.device), None, softcap, sinks))


def test_a_very_negative_sink_is_plain_attention_and_a_large_one_silences_the_head():
    plain, sunk = build("global"), build("global", sinks=True)
    sunk.load_state_dict(plain.state_dict() | {"sinks": torch.full((CONFIG.n_heads,), -1e4)})
    x = torch.randn(2, 9, CONFIG.d_model)
    close(mix(sunk, x), mix(plain, x))
    with torch.no_grad():
        sunk.sinks.fill_(1e4)
    close(mix(sunk, x), torch.zeros_like(x))


def test_sinks_are_vector_parameters_trained_by_the_model():
    module = build("sliding", window=3, sinks=True)
    assert param_roles(module) == {"sinks": VECTOR}
    mix(module, torch.randn(1, 6, CONFIG.d_model)).square().sum().backward()
    assert module.sinks.grad is not None and module.sinks.grad.abs().min() > 0


def test_sinks_and_biases_add_their_parameters_and_no_score_matmul():
    """A sink is one logit per query and head, not a (T x T) product: FLOPs are the biases' only, parameters the heads'."""
    seq_len = 256
    base = nanollm.compile(TINY + "global; sliding(16)").analyze(seq_len)
    sunk = nanollm.compile(TINY + "global(sinks=true, bias=true); sliding(16, sinks=true)").analyze(seq_len)
    heads, q_width, kv_width, d = 4, 4 * 32, 2 * 32, 64
    assert sunk.params_total - base.params_total == 2 * heads + q_width + 2 * kv_width + d
    assert sunk.flops_per_token_fwd - base.flops_per_token_fwd == pytest.approx(0.0, abs=1e-9)  # fvcore counts no bias adds
    assert sunk.cache_bytes_per_token == base.cache_bytes_per_token
