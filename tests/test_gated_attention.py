"""Gated attention (Qiu et al. 2025): the elementwise gate against transformers' Qwen3NextAttention, the per-head gate, the
gates on the values (G2), keys (G3), queries (G4) and on the projected output (G5) from their equations, and all counted
exactly by the analysis (closed forms and FlopCounterMode)."""
from __future__ import annotations

import pytest
import torch
from test_components import CONFIG, GEMMA_NORM, build, close, hf_attention, mix, settings
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen3NextConfig
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextAttention, Qwen3NextRotaryEmbedding

import nanollm
from nanollm.components import complete
from nanollm.ir import Call

TINY = "vocab_size = 256\nd_model = 64\nn_heads = 4\nn_kv_heads = 2\nhead_dim = 16\nd_ff = 128\n"


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_elementwise_gate_matches_qwen3_next_attention(n_kv_heads):
    """q_proj carries [query | gate] per head, (1 + w) per-head QK-norm, a quarter of each head rotated."""
    config = settings(norm=GEMMA_NORM, n_kv_heads=n_kv_heads, rope_theta=1e4)
    rope = complete(Call("rope", (("theta", 1e4), ("fraction", 0.25))), "position", config)
    ours = build("global", config, gate="elementwise", rope=rope)
    hf = Qwen3NextConfig(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=n_kv_heads, head_dim=16,
                         num_hidden_layers=1, layer_types=["full_attention"], rms_norm_eps=config.norm_eps, partial_rotary_factor=0.25,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4}, attn_implementation="eager")
    theirs = Qwen3NextAttention(hf, 0)
    theirs.load_state_dict(ours.state_dict())  # strict: the widened q_proj loads as it is
    x = torch.randn(2, 11, 64)
    expected = hf_attention(theirs, Qwen3NextRotaryEmbedding(hf), x)
    close(mix(ours, x), expected)
    ungated = build("global", config, rope=rope)
    with torch.no_grad():
        ungated.q_proj.weight.copy_(ours.q_proj.weight.view(4, 2, 16, 64)[:, 0].reshape(64, 64))
    ungated.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "q_proj.weight"}, strict=False)
    assert (mix(ungated, x) - expected).abs().max() > 1e-2  # the gate does something at this size


def gated_and_plain(name: str, config, gate: str):
    """A layer with the gate and its ungated twin holding the same weights otherwise."""
    gated, plain = build(name, config, gate=gate), build(name, config)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "gate_proj.weight"})
    return gated, plain


@pytest.mark.parametrize("name", ["global", "sliding"])
def test_head_gate_follows_its_equation(name):
    """out = o_proj(attention_h(x) * sigmoid(x W_gate)_h), one gate per head, from the layer input."""
    gated, plain = gated_and_plain(name, CONFIG, "head")
    with torch.no_grad():
        plain.o_proj.weight.copy_(torch.eye(64))  # the heads' concatenated outputs, before o_proj
    x = torch.randn(2, 9, 64)
    heads = mix(plain, x).unflatten(-1, (4, 16))
    expected = gated.o_proj((heads * torch.sigmoid(x @ gated.gate_proj.weight.T)[..., None]).flatten(-2))
    close(mix(gated, x), expected)


class GatedProjection(torch.nn.Module):
    """G2-G4 written out: a projection's output times sigmoid(x W_gate), e.g. v_proj(x) * sigmoid(x W_gate)."""

    def __init__(self, projection: torch.nn.Linear, gate: torch.nn.Linear) -> None:
        super().__init__()
        self.projection, self.gate = projection, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x) * torch.sigmoid(self.gate(x))


@pytest.mark.parametrize("name", ["global", "sliding"])
def test_value_gate_scales_each_value_channel_before_attention(name):
    """G2: attention over values v_proj(x) * sigmoid(x W_gate), one gate per value channel of each key token."""
    config = settings(n_kv_heads=2)
    gated, plain = gated_and_plain(name, config, "value")
    plain.v_proj = GatedProjection(plain.v_proj, gated.gate_proj)
    x = torch.randn(2, 9, 64)
    close(mix(gated, x), mix(plain, x))
    assert gated.gate_proj.weight.shape == (2 * 16, 64)


@pytest.mark.parametrize("name", ["global", "sliding"])
@pytest.mark.parametrize("gate, projection, width", [("key", "k_proj", 2 * 16), ("query", "q_proj", 4 * 16)])
def test_key_and_query_gates_scale_each_projection_channel_before_the_norm_and_rope(name, gate, projection, width):
    """G3 / G4: attention with keys k_proj(x) * sigmoid(x W_gate) (queries q_proj(x) * ...), gated per channel of the projection,
    then per-head QK-norm'd and rotated as ever."""
    config = settings(n_kv_heads=2)
    gated, plain = gated_and_plain(name, config, gate)
    x = torch.randn(2, 9, 64)
    ungated = mix(plain, x)
    setattr(plain, projection, GatedProjection(getattr(plain, projection), gated.gate_proj))
    close(mix(gated, x), mix(plain, x))
    assert gated.gate_proj.weight.shape == (width, 64) and gated.q_norm.weight.shape == (16,)  # the norm acts after the gate
    assert (mix(gated, x) - ungated).abs().max() > 1e-3  # the gate does something at this size


@pytest.mark.parametrize("name", ["global", "sliding"])
def test_output_gate_scales_the_projected_output(name):
    """G5: o_proj(attention(x)) * sigmoid(x W_gate), one gate per model channel."""
    gated, plain = gated_and_plain(name, CONFIG, "output")
    x = torch.randn(2, 9, 64)
    close(mix(gated, x), mix(plain, x) * torch.sigmoid(x @ gated.gate_proj.weight.T))


@pytest.mark.parametrize("gate, extra", [("elementwise", 4 * 16), ("head", 4), ("value", 2 * 16), ("key", 2 * 16), ("query", 4 * 16),
                                         ("output", 64)])
def test_gate_matmuls_are_counted(gate, extra):
    """The gate adds d_model x (its width) multiply-accumulates per token per layer, and nothing else: by its closed form, and
    FlopCounterMode sees the same difference on the layer itself."""
    seq_len = 64
    base = nanollm.compile(TINY + "global").analyze(seq_len)
    gated = nanollm.compile(TINY + f"global(gate={gate})").analyze(seq_len)
    assert gated.flops_per_token_fwd - base.flops_per_token_fwd == 2 * 64 * extra
    assert gated.params_total - base.params_total == 64 * extra
    assert gated.cache_bytes_per_token == base.cache_bytes_per_token
    counted = []
    for layer in (build("global", settings(n_kv_heads=2)), build("global", settings(n_kv_heads=2), gate=gate)):
        with FlopCounterMode(display=False) as counter:
            mix(layer, torch.randn(1, seq_len, 64))
        counted.append(counter.get_total_flops())
    assert counted[1] - counted[0] == 2 * seq_len * 64 * extra


def test_gate_names_its_choices():
    with pytest.raises(nanollm.ArchError, match="gate"):
        nanollm.compile(TINY + "global(gate=channel)")
