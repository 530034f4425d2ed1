"""RoPE tables and rotations against references written outside this repo, fp32 on CPU.

Tables: transformers' RoPE initialisers (ROPE_INIT_FUNCTIONS, and StableLM's default, which honours
partial_rotary_factor) built from a config, our calls read from the same rope_parameters by the hf adapter.
Rotations: transformers' partial half-split (Qwen3-Next), interleaved (DeepSeek-V3, DeepSeek-V4 on the last
dimensions), and the interleaved pairing written out below from its definition.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb as apply_trailing_interleaved
from transformers.models.qwen3_next.modeling_qwen3_next import apply_rotary_pos_emb as apply_leading_half_split
from transformers.models.stablelm.modeling_stablelm import StableLmRotaryEmbedding

from nanollm.compiler import make_table
from nanollm.components import Rotary, complete
from nanollm.components.position.rope import Layout, rotate
from nanollm.hf import rope_call
from nanollm.ir import Call, ModelConfig

CONFIG = ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
LENGTH = 1024  # positions well past every original context below

YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 256}
TABLE_CASES = {
    "default": (64, {"rope_type": "default", "rope_theta": 1e4}),
    "default_theta_1e6_head_128": (128, {"rope_type": "default", "rope_theta": 1e6}),
    "default_partial_quarter": (64, {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}),
    "default_partial_half": (16, {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5}),
    "linear_factor_8": (64, {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}),
    "linear_partial_half": (64, {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
    "yarn": (64, YARN),
    "yarn_untruncated": (64, {**YARN, "truncate": False}),
    "yarn_gpt_oss": (64, {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                          "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}),
    "yarn_betas": (64, {**YARN, "beta_fast": 8.0, "beta_slow": 2.0}),
    "yarn_attention_factor": (64, {**YARN, "attention_factor": 1.2079}),
    "yarn_mscales": (64, {**YARN, "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 1.0}),
    "yarn_mscale_without_all_dim": (64, {**YARN, "mscale": 0.707}),  # one alone is ignored: 0.1 ln(factor) + 1
    "yarn_partial_half": (64, {**YARN, "partial_rotary_factor": 0.5}),
    "proportional_quarter": (64, {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25}),
    "proportional_quarter_factor_2": (64, {"rope_type": "proportional", "rope_theta": 1e4, "factor": 2.0, "partial_rotary_factor": 0.25}),
}


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def hf_tables(head_dim: int, parameters: dict[str, Any], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos and sin (length, rotated width) for rope_parameters: its initialiser's inverse frequencies and
    attention factor, expanded as its rotary modules do (freqs repeated over both halves)."""
    original = parameters.get("original_max_position_embeddings")
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim, rope_parameters=dict(parameters),
                         max_position_embeddings=int(original * parameters["factor"]) if original else 4096)
    kind = parameters["rope_type"]
    initialise = StableLmRotaryEmbedding.compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
    inv_freq, attention_factor = initialise(config)
    freqs = torch.arange(length)[:, None].float() * inv_freq[None, :].float()
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def our_call(parameters: dict[str, Any]) -> Call:
    """Our position encoding for rope_parameters: as the hf adapter reads them (partial rotation honoured), or for
    proportional, which no supported family uses, the rope call written out."""
    if parameters["rope_type"] == "proportional":
        args = dict(theta=parameters["rope_theta"], factor=parameters.get("factor", 1.0), fraction=parameters["partial_rotary_factor"],
                    placement="proportional")
        return complete(Call("rope", tuple(args.items())), "position", CONFIG)
    return rope_call(parameters, CONFIG, partial=True)


def our_tables(call: Call, head_dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of a position call for positions 0..length-1, as the model computes them."""
    return make_table(Rotary(call, head_dim))(torch.arange(length))


@pytest.mark.parametrize("head_dim, parameters", TABLE_CASES.values(), ids=TABLE_CASES.keys())
def test_rope_tables_match_transformers_initialisers(head_dim: int, parameters: dict[str, Any]) -> None:
    cos, sin = our_tables(our_call(parameters), head_dim, LENGTH)
    hf_cos, hf_sin = hf_tables(head_dim, parameters, LENGTH)
    assert cos.shape == hf_cos.shape
    torch.testing.assert_close(cos, hf_cos, atol=0, rtol=0)  # the same fp32 operations: bit for bit
    torch.testing.assert_close(sin, hf_sin, atol=0, rtol=0)


@pytest.mark.parametrize(
    "changed",
    [{"truncate": False}, {"beta_fast": 8.0}, {"beta_slow": 2.0}, {"attention_factor": 1.2079}, {"mscale": 0.707, "mscale_all_dim": 1.0},
     {"factor": 8.0}, {"original_max_position_embeddings": 512}],
    ids=lambda changed: ",".join(changed),
)
def test_each_yarn_parameter_changes_the_tables(changed: dict[str, Any]) -> None:
    """The YaRN cases above are not vacuous: each parameter moves transformers' tables past the tolerance."""
    base, other = hf_tables(64, YARN, LENGTH), hf_tables(64, {**YARN, **changed}, LENGTH)
    assert max((a - b).abs().max() for a, b in zip(base, other)) > 1e-3


def random_qk(head_dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (2, 4 heads) and keys (2, 2 heads) of shape (B, H, T, head_dim)."""
    return torch.randn(2, 4, length, head_dim), torch.randn(2, 2, length, head_dim)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_partial_rotation_of_first_dims_matches_transformers(fraction: float) -> None:
    """Half-split pairs over the first fraction of each head, the rest passed through (Qwen3-Next's rotation)."""
    parameters = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": fraction}
    call = our_call(parameters)
    q, k = random_qk(64, 50)
    cos, sin = our_tables(call, 64, 50)
    layout = Layout(0, int(64 * fraction), interleaved=False)
    hf_q, hf_k = apply_leading_half_split(q, k, *(table[None] for table in hf_tables(64, parameters, 50)))  # (B, T, width) tables
    torch.testing.assert_close(rotate(q, cos, sin, layout), hf_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(rotate(k, cos, sin, layout), hf_k, atol=1e-6, rtol=0)


def rotate_pairs(x: torch.Tensor, inv_freq: torch.Tensor, start: int) -> torch.Tensor:
    """The interleaved definition, pair by pair: dimensions (start + 2i, start + 2i + 1) turn by angle t * inv_freq[i]."""
    out = x.clone()
    for t in range(x.shape[-2]):
        for i, frequency in enumerate(inv_freq.tolist()):
            angle = torch.tensor(t * frequency, dtype=torch.float64)
            a, b = x[..., t, start + 2 * i].double(), x[..., t, start + 2 * i + 1].double()
            out[..., t, start + 2 * i] = (a * angle.cos() - b * angle.sin()).float()
            out[..., t, start + 2 * i + 1] = (a * angle.sin() + b * angle.cos()).float()
    return out


@pytest.mark.parametrize("fraction, placement", [(1.0, "first"), (0.5, "first"), (0.25, "last")])
def test_interleaved_rotation_matches_the_pairing_definition(fraction: float, placement: str) -> None:
    head_dim, length, theta = 16, 20, 100.0
    args = (("theta", theta), ("fraction", fraction), ("placement", placement), ("interleaved", True))
    call = complete(Call("rope", args), "position", CONFIG)
    width = int(head_dim * fraction)
    start = head_dim - width if placement == "last" else 0
    inv_freq = 1.0 / theta ** (torch.arange(0, width, 2, dtype=torch.float64) / width)
    q, _ = random_qk(head_dim, length)
    cos, sin = our_tables(call, head_dim, length)
    torch.testing.assert_close(rotate(q, cos, sin, Layout(start, start + width, True)), rotate_pairs(q, inv_freq, start), atol=1e-5, rtol=0)


def test_interleaved_rotation_matches_deepseek_v3_up_to_its_permutation() -> None:
    """DeepSeek-V3 returns the rotated pairs de-interleaved (evens, then odds), for queries and keys alike: the same
    vectors permuted, so the attention scores q.k are the same."""
    head_dim, length = 64, 100
    parameters = {"rope_type": "default", "rope_theta": 1e4}
    call = complete(Call("rope", (("theta", 1e4), ("interleaved", True))), "position", CONFIG)
    q, k = random_qk(head_dim, length)
    cos, sin = our_tables(call, head_dim, length)
    layout = Layout(0, head_dim, True)
    ours_q, ours_k = rotate(q, cos, sin, layout), rotate(k, cos, sin, layout)
    hf_q, hf_k = apply_rotary_pos_emb_interleave(q, k, *(table[None] for table in hf_tables(head_dim, parameters, length)))
    deinterleave = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    torch.testing.assert_close(ours_q[..., deinterleave], hf_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_k[..., deinterleave], hf_k, atol=1e-5, rtol=0)
    scores = ours_q @ ours_k.repeat_interleave(2, dim=1).transpose(-2, -1)
    torch.testing.assert_close(scores, hf_q @ hf_k.repeat_interleave(2, dim=1).transpose(-2, -1), atol=1e-4, rtol=0)


def test_interleaved_rotation_of_last_dims_matches_deepseek_v4() -> None:
    """DeepSeek-V4 rotates interleaved pairs in the last 64 of 512 dimensions (here the last 16 of 128)."""
    head_dim, width, length, theta = 128, 16, 60, 1e4
    call = complete(Call("rope", (("theta", theta), ("fraction", width / head_dim), ("placement", "last"), ("interleaved", True))),
                    "position", CONFIG)
    q, _ = random_qk(head_dim, length)
    cos, sin = our_tables(call, head_dim, length)
    inv_freq = 1.0 / theta ** (torch.arange(0, width, 2, dtype=torch.int64).float() / width)
    angles = torch.arange(length)[:, None].float() * inv_freq[None, :]  # V4 hands over one angle per pair
    expected = apply_trailing_interleaved(q, angles.cos()[None], angles.sin()[None])
    torch.testing.assert_close(rotate(q, cos, sin, Layout(head_dim - width, head_dim, True)), expected, atol=1e-6, rtol=0)
