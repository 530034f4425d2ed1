"""Multi-head latent attention against transformers' DeepseekV3Attention (with and without query compression,
interleaved and half-split RoPE, DeepSeek's YaRN with its scale correction), the absorbed form against the training
form, and its accounting against closed forms and FlopCounterMode."""
from __future__ import annotations

import pytest
import torch
from test_components import CONFIG, build, close, hf_attention, mix
from test_gated_attention import GatedProjection
from torch.utils.flop_counter import FlopCounterMode
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

import nanollm
from nanollm.budget import solve
from nanollm.components import complete
from nanollm.hf import rope_call
from nanollm.ir import Call

SIZES = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12)  # v wider than nope: no mix-up passes
YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0, "original_max_position_embeddings": 8, "mscale": 0.8,
        "mscale_all_dim": 1.0, "beta_fast": 4.0, "beta_slow": 1.0}
DEFAULT = {"rope_type": "default", "rope_theta": 1e4}
TINY = "vocab_size = 256\nd_model = 64\nn_heads = 4\nn_kv_heads = 4\nhead_dim = 16\nd_ff = 128\n"


def mla_pair(q_lora_rank: int, interleave: bool, rope_parameters: dict, **args) -> tuple[torch.nn.Module, DeepseekV3Config]:
    """Our `mla` (built as the component tests build) and the transformers config of the same attention."""
    hf = DeepseekV3Config(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank or None,
                          rope_interleave=interleave, rope_parameters=dict(rope_parameters), attn_implementation="eager", **SIZES)
    rope = rope_call(dict(rope_parameters), CONFIG)
    rope = complete(Call(rope.name, tuple((k, v) for k, v in rope.args if k != "interleaved") + (("interleaved", interleave),)),
                    "position", CONFIG)
    return build("mla", CONFIG, q_lora_rank=q_lora_rank, rope=rope, **(SIZES | args)), hf


@pytest.mark.parametrize("q_lora_rank", [0, 24], ids=["q-direct", "q-latent"])
@pytest.mark.parametrize("interleave, rope_parameters", [(True, DEFAULT), (False, DEFAULT), (True, YARN)],
                         ids=["interleaved", "half-split", "yarn-mscale"])
def test_mla_matches_deepseek_v3_attention(q_lora_rank, interleave, rope_parameters):
    ours, hf = mla_pair(q_lora_rank, interleave, rope_parameters)
    theirs = DeepseekV3Attention(hf, 0)
    theirs.load_state_dict(ours.state_dict())  # strict: the names are transformers'
    x = torch.randn(2, 13, 64)
    expected = hf_attention(theirs, DeepseekV3RotaryEmbedding(hf), x)
    close(mix(ours, x), expected)


@pytest.mark.parametrize("q_lora_rank", [0, 24])
@pytest.mark.parametrize("gate", ["none", "elementwise", "head", "query", "output"])
def test_mla_absorbed_form_equals_training_form(q_lora_rank, gate):
    """Attending over the latent with kv_b_proj folded into query and output is the same function."""
    ours, _ = mla_pair(q_lora_rank, True, YARN, gate=gate)
    absorbed, _ = mla_pair(q_lora_rank, True, YARN, gate=gate, absorb=True)
    absorbed.load_state_dict(ours.state_dict())
    x = torch.randn(2, 13, 64)
    close(mix(absorbed, x), mix(ours, x), atol=2e-5)


def test_mla_gate_follows_its_equation():
    gated, _ = mla_pair(0, True, DEFAULT, gate="head")
    plain, _ = mla_pair(0, True, DEFAULT)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "gate_proj.weight"})
    with torch.no_grad():
        plain.o_proj.weight.copy_(torch.eye(64, 48))  # passes the heads' concatenated outputs (4 x 12) through
    x = torch.randn(2, 9, 64)
    heads = mix(plain, x)[..., :48].unflatten(-1, (4, 12))
    close(mix(gated, x), gated.o_proj((heads * torch.sigmoid(x @ gated.gate_proj.weight.T)[..., None]).flatten(-2)))


def test_mla_query_gate_scales_each_query_channel_before_rope():
    """G4: queries q_proj(x) * sigmoid(x W_gate), per channel of every head's [no-RoPE | RoPE] query, then rotated."""
    gated, _ = mla_pair(0, True, DEFAULT, gate="query")
    plain, _ = mla_pair(0, True, DEFAULT)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "gate_proj.weight"})
    x = torch.randn(2, 9, 64)
    ungated = mix(plain, x)
    plain.q_proj = GatedProjection(plain.q_proj, gated.gate_proj)
    close(mix(gated, x), mix(plain, x))
    assert gated.gate_proj.weight.shape == (4 * (8 + 8), 64)
    assert (mix(gated, x) - ungated).abs().max() > 1e-3


def test_mla_output_gate_scales_the_projected_output():
    """G5: o_proj(attention(x)) * sigmoid(x W_gate), one gate per model channel."""
    gated, _ = mla_pair(24, True, DEFAULT, gate="output")
    plain, _ = mla_pair(24, True, DEFAULT)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "gate_proj.weight"})
    x = torch.randn(2, 9, 64)
    close(mix(gated, x), mix(plain, x) * torch.sigmoid(x @ gated.gate_proj.weight.T))


@pytest.mark.parametrize("absorb", [False, True])
def test_mla_shared_latent_is_a_query_latent_equal_to_the_key_value_latent(absorb):
    """shared_latent: q = q_b_proj(c_kv), c_kv the normed key/value latent; as MLA with a query latent whose down-projection
    and norm are the key/value latent's, and d_model x r + r parameters fewer."""
    shared, _ = mla_pair(0, True, YARN, shared_latent=True, absorb=absorb)
    separate, _ = mla_pair(16, True, YARN, absorb=absorb)
    weights = shared.state_dict()
    separate.load_state_dict(weights | {"q_a_proj.weight": weights["kv_a_proj_with_mqa.weight"][:16],
                                        "q_a_layernorm.weight": weights["kv_a_layernorm.weight"]})
    x = torch.randn(2, 13, 64)
    close(mix(shared, x), mix(separate, x), atol=2e-5)
    assert sum(p.numel() for p in separate.parameters()) - sum(p.numel() for p in shared.parameters()) == 64 * 16 + 16


def mla_macs(seq_len: int, d: int, heads: int, kv: int, q: int, nope: int, rope: int, v: int, absorb: bool, shared: bool = False) -> int:
    """Closed-form multiply-accumulates of one mla layer over one causal sequence (shared: queries from the kv latent)."""
    query = d * q + q * heads * (nope + rope) if q else kv * heads * (nope + rope) if shared else d * heads * (nope + rope)
    projections = query + d * (kv + rope) + heads * v * d
    pairs = seq_len * (seq_len + 1) // 2
    if absorb:  # q_nope -> latent, latent -> value per head; scores over (kv + rope), values of width kv
        return seq_len * (projections + heads * (nope * kv + kv * v)) + heads * pairs * (2 * kv + rope)
    return seq_len * (projections + kv * heads * (nope + v)) + heads * pairs * (nope + rope + v)


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("q_lora_rank, shared", [(0, False), (32, False), (0, True)], ids=["q-direct", "q-latent", "shared-latent"])
def test_mla_flops_and_cache_match_closed_forms(absorb, q_lora_rank, shared):
    seq_len = 96
    call = (f"mla(kv_lora_rank=32, q_lora_rank={q_lora_rank}, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, "
            f"absorb={str(absorb).lower()}, shared_latent={str(shared).lower()})")
    compiled = nanollm.compile(TINY + f"{call} ffn=none")
    analysis = compiled.analyze(seq_len)
    head = 64 * 256  # the vocabulary projection (tied)
    expected = mla_macs(seq_len, 64, 4, 32, q_lora_rank, 16, 8, 24, absorb, shared) + seq_len * head
    assert analysis.flops_per_token_fwd * seq_len == 2 * expected
    assert analysis.cache_bytes_per_token == (32 + 8) * 2  # the latent and the RoPE key, bf16
    # FlopCounterMode sees SDPA on meta as its math decomposition over the full T x T square; ours counts the triangle.
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        compiled.graph(ids)
    width = (2 * 32 + 8) if absorb else (16 + 8 + 24)
    square, triangle = 4 * seq_len * seq_len * width, 4 * seq_len * (seq_len + 1) // 2 * width
    assert counter.get_total_flops() - 2 * square == 2 * (expected - triangle)


def test_mla_cache_at_deepseek_v3_sizes_is_576_per_token_and_layer():
    arch = nanollm.compile("d_model = 7168\nn_heads = 128\n" + "mla(kv_lora_rank=512, q_lora_rank=1536, rope=rope(interleaved=true))")
    assert arch.graph.get_submodule("layers.0.mixer").cache_elements(1) == 576


@pytest.mark.parametrize("text, message", [
    ("mla(kv_lora_rank=128)", "kv_lora_rank = 128 is larger than the width"),
    ("mla(kv_lora_rank=32, q_lora_rank=100)", "q_lora_rank = 100 is larger than the width"),
    ("mla(kv_lora_rank=32, qk_rope_head_dim=7)", "even"),
    ("mla(kv_lora_rank=32, q_lora_rank=16, shared_latent=true)", "shared_latent takes the queries from the key/value latent"),
])
def test_mla_bad_arguments_are_positioned_errors(text, message):
    with pytest.raises(nanollm.ArchError, match=message) as error:
        nanollm.compile(TINY + text)
    assert ":7:" in str(error.value)


@pytest.mark.parametrize("q_lora_rank", [0, 512])
def test_mla_ranks_scale_with_the_width_under_a_budget(q_lora_rank):
    """Budget sizing keeps each latent rank at its ratio to d_model, written (q) or at its default (kv: 512 at d_model
    1024); a rank of 0 (no query latent) stays 0."""
    text = (f"d_model = 1024\nn_heads = 8\nn_kv_heads = 8\nhead_dim = 128\nd_ff = 3072\nvocab_size = 4096\n"
            f"repeat 2 < mla(q_lora_rank={q_lora_rank}, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32) >")
    solution = solve(text, 1e15)
    d_model = solution.arch.config.d_model
    assert d_model < 1024
    args = solution.arch.layers[0].mixer.kwargs()
    assert args["kv_lora_rank"] == max(64, round(d_model / 2 / 64) * 64)
    assert args["q_lora_rank"] == (max(64, round(d_model / 2 / 64) * 64) if q_lora_rank else 0)


def test_mla_with_values_wider_than_queries_matches_deepseek_v3_attention():
    """Values wider than query/key heads (24 > 8 + 8): the padding for CPUs' fused attention goes on queries and keys."""
    ours, hf = mla_pair(0, True, DEFAULT, v_head_dim=24)
    hf.v_head_dim = 24
    theirs = DeepseekV3Attention(hf, 0)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 13, 64)
    close(mix(ours, x), hf_attention(theirs, DeepseekV3RotaryEmbedding(hf), x))
