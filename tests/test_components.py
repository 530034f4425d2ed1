"""Every component checked against an implementation written outside this repo, fp32 on CPU.

References: Hugging Face transformers (Qwen3 / Llama modules with copied weights) and, for the
sliding window, an explicit-mask attention written below straight from the definition "query i sees
key j iff i - window < j <= i". The mixture of experts has its own file, test_moe.py.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig, Qwen3Config
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Attention,
    Qwen3MLP,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    apply_rotary_pos_emb,
)

from nanollm.compiler import initialize, make_table
from nanollm.components import REGISTRY, Rotary, complete
from nanollm.components.norm.rmsnorm import RMSNorm
from nanollm.components.position.rope import Layout, rotate
from nanollm.ir import Call, ModelConfig

CONFIG = ModelConfig(
    vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, seq_len=32
)
ATOL = 1e-5
MATRIX_SCALE = 10.0  # init std 0.02 -> 0.2: unit-scale activations in a 64-wide model
SMALL_ARGS = {"window": 3}  # overrides of registry defaults that would make a tiny test vacuous
MIXERS = sorted(name for name, spec in REGISTRY.items() if spec.kind == "mixer")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def build(name: str, config: ModelConfig = CONFIG, **args):
    """A registered component with default arguments (SMALL_ARGS first), initialised as the compiler does.

    Matrices are then scaled by MATRIX_SCALE so outputs are O(1) and ATOL is a tight relative bound too,
    and norm scales jittered away from 1 so that a weight that fails to be copied shows up.
    """
    spec = REGISTRY[name]
    kwargs = {p.name: SMALL_ARGS.get(p.name, p.default_for(config)) for p in spec.params} | args
    module = spec.module(config, **kwargs)
    initialize(module)
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() > 1:
                param.mul_(MATRIX_SCALE)
    for norm in module.modules():
        if isinstance(norm, RMSNorm):
            torch.nn.init.normal_(norm.weight, mean=1.0, std=0.3)
    return module.eval()


def hf_config(config: ModelConfig, cls=Qwen3Config):
    """The transformers config (Qwen3 or Llama) describing the same dense model, eager attention."""
    return cls(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=1,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attn_implementation="eager",
    )


def tables(head_dim: int, theta: float, length: int, **rope) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of a `rope` call for positions 0..length-1, as the model computes them."""
    call = complete(Call("rope", (("theta", theta), *rope.items())), "position", CONFIG)
    return make_table(Rotary(call, head_dim))(torch.arange(length))


def mix(module, x: torch.Tensor) -> torch.Tensor:
    """Run any mixer on x (B, T, d) with the inputs it declares; the output only."""
    args = []
    for wanted in module.inputs():
        if isinstance(wanted, Rotary):
            args += make_table(wanted)(torch.arange(x.shape[1]))
        else:
            args.append({"x": x, "token_ids": torch.zeros(x.shape[:2], dtype=torch.long), "positions": torch.arange(x.shape[1])}[wanted])
    out = module(*args)
    return out[0] if module.outputs != ("out",) else out


# --- norm, position, dense FFN ---------------------------------------------------------------


@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])  # 1e-3: the variance is of the order of eps
def test_rmsnorm_matches_qwen3(dim, eps, scale):
    ours = RMSNorm(dim, eps)
    torch.nn.init.normal_(ours.weight, mean=1.0, std=0.3)
    theirs = Qwen3RMSNorm(dim, eps=eps)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, dim) * scale
    close(ours(x), theirs(x))


@pytest.mark.parametrize("head_dim", [16, 128])
@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_rope_matches_qwen3(head_dim, theta):
    config = dataclasses.replace(CONFIG, head_dim=head_dim, rope_theta=theta)
    batch, length = 2, 300
    x = torch.randn(batch, length, config.d_model)
    cos, sin = tables(head_dim, theta, length)
    positions = torch.arange(length).expand(batch, length)
    hf_cos, hf_sin = Qwen3RotaryEmbedding(hf_config(config))(x, position_ids=positions)  # (B, T, head_dim)
    close(cos.expand_as(hf_cos), hf_cos, atol=0)
    close(sin.expand_as(hf_sin), hf_sin, atol=0)

    q = torch.randn(batch, config.n_heads, length, head_dim)
    k = torch.randn(batch, config.n_kv_heads, length, head_dim)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)  # unsqueeze_dim=1: (B, H, T, head_dim) layout
    layout = Layout(0, head_dim, interleaved=False)
    close(rotate(q, cos, sin, layout), hf_q, atol=0)
    close(rotate(k, cos, sin, layout), hf_k, atol=0)


@pytest.mark.parametrize("d_ff", [128, 48])
def test_swiglu_matches_qwen3_mlp(d_ff):
    ours = build("swiglu", d_ff=d_ff)
    theirs = Qwen3MLP(hf_config(dataclasses.replace(CONFIG, d_ff=d_ff)))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, CONFIG.d_model)
    close(ours(x), theirs(x))


# --- attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qwen3", "llama"])
def test_global_attention_matches_hf(n_kv_heads, qk_norm):
    config = dataclasses.replace(CONFIG, n_kv_heads=n_kv_heads, qk_norm="head" if qk_norm else "none")
    ours = build("global", config)
    # Without QK-norm the reference is Llama's attention (same projections, no q_norm/k_norm).
    theirs = Qwen3Attention(hf_config(config), 0) if qk_norm else LlamaAttention(hf_config(config, LlamaConfig), 0)
    theirs.load_state_dict(ours.state_dict())  # strict: every projection and norm is copied
    theirs.eval()

    batch, length = 2, 11
    x = torch.randn(batch, length, config.d_model)
    positions = torch.arange(length).expand(batch, length)
    rope = Qwen3RotaryEmbedding(hf_config(config))(x, position_ids=positions)
    causal = torch.full((length, length), float("-inf")).triu(1).expand(batch, 1, length, length)
    expected, _ = theirs(x, position_embeddings=rope, attention_mask=causal)
    close(mix(ours, x), expected)


def window_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + mask) V, the mask built entry by entry from the definition."""
    length = q.shape[-2]
    mask = torch.full((length, length), float("-inf"))
    for i in range(length):
        for j in range(length):
            if i - window < j <= i:
                mask[i, j] = 0.0
    groups = q.shape[1] // k.shape[1]  # query head h reads key/value head h // groups
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask).softmax(dim=-1) @ v


def random_qkv(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(2, CONFIG.n_heads, length, CONFIG.head_dim)
    k, v = (torch.randn(2, CONFIG.n_kv_heads, length, CONFIG.head_dim) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("window", [1, 2, 3, 7, 23, 24, 30])
def test_sliding_matches_explicit_mask(window):
    q, k, v = random_qkv(24)
    close(build("sliding", window=window).attend_masked(q, k, v), window_reference(q, k, v, window))


@pytest.mark.parametrize("window", [1, 2, 5, 16, 23])
def test_sliding_window_is_exact(window):
    """Changing token 0 changes exactly the outputs at positions 0..window-1."""
    module, length = build("sliding", window=window), 16
    x = torch.randn(2, length, CONFIG.d_model)
    changed = x.clone()
    changed[:, 0] = torch.randn(CONFIG.d_model)
    moved = (mix(module, changed) - mix(module, x)).abs().amax(dim=(0, 2)) > 0
    assert moved.tolist() == (torch.arange(length) < window).tolist()


# Length 300 spans three 128-blocks, so with a small window whole blocks are skipped.
@pytest.mark.parametrize("window", [1, 3, 130, 300, 512])
def test_sliding_flex_matches_masked(window):
    module = build("sliding", window=window)
    q, k, v = random_qkv(300)
    with torch.no_grad():
        close(module.attend_flex(q, k, v), module.attend_masked(q, k, v))


@pytest.mark.parametrize("window", [16, 17, 4096])
def test_sliding_with_long_window_is_global(window):
    sliding, full = build("sliding", window=window), build("global")
    full.load_state_dict(sliding.state_dict())
    x = torch.randn(2, 16, CONFIG.d_model)
    close(mix(sliding, x), mix(full, x))


@pytest.mark.parametrize("name", MIXERS)
def test_mixer_is_causal(name):
    """Changing token t never changes an output before t, and does change the output at t."""
    module, length = build(name), 12
    x = torch.randn(2, length, CONFIG.d_model)
    base = mix(module, x)
    for t in range(length):
        changed = x.clone()
        changed[:, t] = torch.randn(CONFIG.d_model)
        out = mix(module, changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"output before {t} depends on token {t}"
        assert not torch.allclose(out[:, t], base[:, t]), f"output at {t} ignores token {t}"
