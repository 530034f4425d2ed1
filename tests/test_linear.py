"""Gated DeltaNet and KDA: the delta rule's chunked, recurrent and naive forms agree (values and gradients, any length),
the mixers equal transformers' layers weight for weight, decode (a chunked prefill, then token by token), run on meta, and count exact FLOPs."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    KimiLinearConfig,
    OlmoHybridConfig,
    Qwen3_5TextConfig,
    Qwen3NextConfig,
)
from transformers.models.kimi_linear.modeling_kimi_linear import (
    KimiLinearDeltaAttention,
)
from transformers.models.olmo_hybrid.modeling_olmo_hybrid import OlmoHybridGatedDeltaNet
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

import nanollm
from nanollm.compiler import initialize
from nanollm.components import REGISTRY, complete
from nanollm.components.linear.delta_rule import (
    chunked_delta_rule,
    l2_normalize,
    naive_delta_rule,
    recurrent_delta_rule,
    unit_lower_inverse,
)
from nanollm.errors import ArchError
from nanollm.ir import Call, ModelConfig

SMALL = "vocab_size = 256\nd_model = 64\nn_heads = 4\nn_kv_heads = 2\nhead_dim = 16\nd_ff = 96\n"
CONFIG = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8)


def delta_inputs(length: int, per_channel: bool, decay: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random fp32 q, k (normalised), v, log decay, beta and an initial state: 2 sequences, 3 heads, d_k 8, d_v 6."""
    generator = torch.Generator().manual_seed(seed)
    batch, heads, d_k, d_v = 2, 3, 8, 6
    q, k = (l2_normalize(torch.randn(batch, heads, length, d_k, generator=generator)) for _ in range(2))
    v = torch.randn(batch, heads, length, d_v, generator=generator)
    g = -decay * torch.rand(batch, heads, length, *((d_k,) if per_channel else ()), generator=generator)
    beta = torch.rand(batch, heads, length, generator=generator)
    return q, k, v, g, beta, torch.randn(batch, heads, d_k, d_v, generator=generator)


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
@pytest.mark.parametrize("length, chunk", [(1, 4), (16, 8), (37, 8), (37, 16), (37, 64)])
def test_three_forms_of_the_delta_rule_agree(per_channel: bool, length: int, chunk: int) -> None:
    q, k, v, g, beta, state = delta_inputs(length, per_channel)
    naive, naive_state = naive_delta_rule(q, k, v, g, beta, state)
    for out, final in (recurrent_delta_rule(q, k, v, g, beta, state), chunked_delta_rule(q, k, v, g, beta, state, chunk=chunk)):
        torch.testing.assert_close(out, naive, atol=1e-5, rtol=0)
        torch.testing.assert_close(final, naive_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_gradients_of_the_chunked_form_match_the_naive_form(per_channel: bool) -> None:
    inputs = delta_inputs(21, per_channel)
    grads = []
    for rule in (naive_delta_rule, lambda *x: chunked_delta_rule(*x, chunk=8)):
        leaves = [x.clone().requires_grad_() for x in inputs]
        out, final = rule(*leaves)
        (out.square().sum() + final.sum()).backward()
        grads.append([leaf.grad for leaf in leaves])
    for chunked, naive in zip(*grads[::-1]):
        torch.testing.assert_close(chunked, naive, atol=1e-5, rtol=0)


def test_chunked_per_channel_decay_stays_finite_where_a_factored_decay_would_overflow() -> None:
    """Decays of up to e^-40 per token: exp(+cumulative decay) over a chunk of 64 would overflow fp32. (Cumulative log
    decays near -1000 keep ~1e-4 relative precision in fp32, hence rtol.)"""
    q, k, v, g, beta, state = delta_inputs(64, per_channel=True, decay=40.0)
    out, final = chunked_delta_rule(q, k, v, g, beta, state, chunk=64)
    naive, naive_state = naive_delta_rule(*(x.double() for x in (q, k, v, g, beta, state)))  # the reference without roundoff
    assert out.isfinite().all()
    torch.testing.assert_close(out, naive.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(final, naive_state.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [1, 2, 5, 8, 13, 64])
def test_unit_lower_inverse_inverts_i_plus_the_strict_lower_triangle(size: int) -> None:
    """Whatever lies on and above the diagonal is ignored; padded sizes (5, 13) and a single block (8) included."""
    matrix = torch.randn(3, size, size, generator=torch.Generator().manual_seed(size)) * 0.2
    expected = torch.linalg.inv(torch.eye(size, dtype=torch.float64) + matrix.double().tril(-1))  # without fp32 roundoff
    torch.testing.assert_close(unit_lower_inverse(matrix), expected.float(), atol=1e-5, rtol=1e-5)


def mixer(name: str, **args: object) -> torch.nn.Module:
    """A randomly initialised mixer of CONFIG."""
    torch.manual_seed(0)
    call = complete(Call(name, tuple(args.items())), "mixer", CONFIG)
    module = REGISTRY[name].module(CONFIG, **call.kwargs())
    initialize(module)
    return module


MIXERS = {
    "gdn": {"key_heads": 2, "value_dim": 6, "chunk": 5},
    "gdn-qwen3_5": {"layout": "qwen3_5", "chunk": 5},
    "gdn-qwen3_next": {"layout": "qwen3_next", "key_heads": 2, "value_dim": 6, "chunk": 5, "negative_eigenvalues": True},
    "kda": {"gate_rank": 4, "chunk": 5},
}


@pytest.mark.parametrize("args", MIXERS.values(), ids=MIXERS.keys())
def test_mixer_forms_and_chunked_prefill_then_token_by_token_decoding_agree(args: dict) -> None:
    module = mixer("kda" if "gate_rank" in args else "gdn", **args)
    x = torch.randn(2, 13, CONFIG.d_model)
    naive = module.mix(x, "naive")
    torch.testing.assert_close(module(x), naive, atol=1e-5, rtol=0)
    torch.testing.assert_close(module.mix(x, "recurrent"), naive, atol=1e-5, rtol=0)
    state = module.state(2, 10_000, "cpu", torch.float32)
    # a prefill of a chunk and a part in the chunked form, then one token at a time by the recurrence
    steps = [module.decode(state, 0, x[:, :8])] + [module.decode(state, t, x[:, t:t + 1]) for t in range(8, x.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), naive, atol=1e-5, rtol=0)
    assert sum(tensor.numel() for tensor in state.values()) == 2 * module.cache_elements(13) == 2 * module.cache_elements(10_000)


def load_from(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Random decays, biases and norm scales in transformers' layer, then its weights into ours by our hf_weights."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if parameter.dim() < 2 or "A_log" in name:
                parameter.uniform_(0.5, 1.5) if "norm" in name else parameter.uniform_(-1.0, 1.0)
    state = theirs.state_dict()
    ours.load_state_dict({name: state[hf_name] for name, hf_name in ours.hf_weights().items()})


LINEAR_HEADS = {"hidden_size": 32, "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 8,
                    "linear_value_head_dim": 6, "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-3, "num_hidden_layers": 1,
                    "layer_types": ["linear_attention"]}
HF_LAYERS = {
    "qwen3_next": (Qwen3NextGatedDeltaNet, Qwen3NextConfig, {}, {"layout": "qwen3_next", "gate_eps": 1e-3}),
    "qwen3_5": (Qwen3_5GatedDeltaNet, Qwen3_5TextConfig, {}, {"layout": "qwen3_5", "gate_eps": 1e-3}),
    "olmo_hybrid": (OlmoHybridGatedDeltaNet, OlmoHybridConfig,
                    {"linear_allow_neg_eigval": True, "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]},
                    {"negative_eigenvalues": True, "gate_eps": 1e-5}),  # OLMo's gated norm keeps fla's 1e-5
}


@pytest.mark.parametrize("family", HF_LAYERS)
def test_gated_deltanet_equals_transformers_layer(family: str) -> None:
    layer, config_class, extra, args = HF_LAYERS[family]
    theirs = layer(config_class(**{**LINEAR_HEADS, **extra}), layer_idx=0).eval()
    ours = mixer("gdn", key_heads=2, value_dim=6, **args)
    load_from(ours, theirs)
    x = torch.randn(2, 70, 32)  # past transformers' chunk of 64
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_kda_equals_transformers_kimi_delta_attention() -> None:
    config = KimiLinearConfig(hidden_size=32, num_hidden_layers=2, rms_norm_eps=1e-5,
                              linear_attn_config={"num_heads": 4, "head_dim": 8, "short_conv_kernel_size": 3})
    theirs = KimiLinearDeltaAttention(config, layer_idx=0).eval()
    ours = mixer("kda", conv=3, gate_eps=1e-5)
    load_from(ours, theirs)
    x = torch.randn(2, 70, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def inverse_macs(chunk: int) -> int:
    """Multiply-accumulates of the unit-lower-triangular inverse of one (chunk, chunk) matrix, padded to a power of two P:
    blocks of b = min(8, P) rows by doubling (2 (log2 b - 1) products of b^3), then P / 2s joins of two s^3 products
    for s = b, 2b, ..., P / 2."""
    padded = 1 << (chunk - 1).bit_length()
    base = min(8, padded)
    macs = padded // base * 2 * max(base.bit_length() - 2, 0) * base**3
    size = base
    while size < padded:
        macs += padded // (2 * size) * 2 * size**3
        size *= 2
    return macs


def delta_rule_macs(length: int, heads: int, d_k: int, d_v: int, chunk: int, scores: int) -> int:
    """Forward multiply-accumulates of the chunked delta rule over one sequence, given the in-chunk scores' per chunk:
    the inverse, the state read by the decayed keys and by the queries, the inverse times what the keys' read leaves of
    the values, the scores times those new values, and the state written after every chunk but the last (training
    needs no final state)."""
    chunks = math.ceil(length / chunk)
    per_chunk = scores + inverse_macs(chunk) + 2 * chunk * d_k * d_v + 2 * chunk * chunk * d_v
    return heads * (chunks * per_chunk + (chunks - 1) * chunk * d_k * d_v)


def gdn_macs(length: int, d: int, heads: int, key_heads: int, d_k: int, d_v: int, conv: int, chunk: int) -> int:
    """Closed-form forward multiply-accumulates of a separate-layout gdn layer over one sequence: beta K K^T and Q K^T
    as whole squares per chunk."""
    keys, values = key_heads * d_k, heads * d_v
    projections = d * (2 * keys + 2 * values + 2 * heads) + values * d
    return length * (projections + (2 * keys + values) * conv) + delta_rule_macs(length, heads, d_k, d_v, chunk, 2 * chunk * chunk * d_k)


def kda_macs(length: int, d: int, heads: int, d_k: int, conv: int, chunk: int, rank: int) -> int:
    """Closed-form forward multiply-accumulates of a kda layer: the per-channel scores of keys and of queries against the
    keys, the lower triangle with its diagonal of the chunk padded to a power of two P."""
    width = heads * d_k
    projections = d * 3 * width + 2 * (d * rank + rank * width) + d * heads + width * d
    padded = 1 << (chunk - 1).bit_length()
    scores = 2 * padded * (padded + 1) // 2 * d_k
    return length * (projections + 3 * width * conv) + delta_rule_macs(length, heads, d_k, d_k, chunk, scores)


@pytest.mark.parametrize("length", [64, 100])
def test_gdn_and_kda_flops_and_state_match_closed_forms(length: int) -> None:
    analysis = nanollm.compile(SMALL + "gdn(key_heads=2, value_dim=8, chunk=32) ffn=none; kda(chunk=32, gate_rank=8) ffn=none").analyze(length)
    gdn, kda = analysis.layers
    assert round(gdn.flops_per_token_fwd * length) == 2 * gdn_macs(length, 64, 4, 2, 16, 8, 4, 32)
    assert round(kda.flops_per_token_fwd * length) == 2 * kda_macs(length, 64, 4, 16, 4, 32, 8)
    assert gdn.state_bytes == 2 * (4 * 16 * 8 + (2 * 32 + 32) * 3)  # bf16: the 4 heads' 16 x 8 states, 3 past conv inputs
    assert kda.state_bytes == 2 * (4 * 16 * 16 + 3 * 64 * 3)
    assert gdn.cache_bytes_per_token == 0  # all it holds is the state, reported per sequence, not per token
    assert analysis.state_bytes == gdn.state_bytes + kda.state_bytes


def test_gdn_closed_form_matches_flop_counter_mode_on_a_real_run() -> None:
    """torch's own counter on CPU (it does not count the convolution's shifted sums on CPU, elementwise: that term is
    added from the closed form)."""
    module = mixer("gdn", key_heads=2, value_dim=6, chunk=16)
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(1, 40, CONFIG.d_model))
    convolution = 40 * module.conv1d.in_channels * module.conv1d.kernel_size[0]
    assert counter.get_total_flops() // 2 + convolution == gdn_macs(40, 32, 4, 2, 8, 6, 4, 16)


def test_attention_layers_hold_no_state() -> None:
    analysis = nanollm.compile(SMALL + "gdn; global").analyze(64)
    assert analysis.layers[1].state_bytes == 0 and analysis.layers[1].cache_bytes_per_token == 2 * 2 * 2 * 16


BAD = [
    ("gdn(chunk=0)", 1, 11, "gdn: chunk must be positive, got 0"),
    ("gdn(key_heads=3)", 1, 1, "gdn: key_heads = 3 does not divide heads = 16"),
    ("kda(conv=0)", 1, 10, "kda: conv must be positive, got 0"),
    ("gdn(layout=fused)", 1, 12, "gdn: unknown layout 'fused'"),
]


@pytest.mark.parametrize("text, line, col, message", BAD, ids=[b[0] for b in BAD])
def test_bad_mixer_arguments_are_positioned_errors(text: str, line: int, col: int, message: str) -> None:
    with pytest.raises(ArchError) as raised:
        nanollm.compile(text)
    assert message in raised.value.message
    assert (raised.value.pos.line, raised.value.pos.col) == (line, col)
