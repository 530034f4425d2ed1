"""Every component checked against an implementation written outside this repo, fp32 on CPU.

References: Hugging Face transformers (Qwen3 / Llama / Gemma 2-3 / OLMo 2-3 / StableLM modules with copied weights) and, for the
sliding window, an explicit-mask attention written below straight from the definition "query i sees
key j iff i - window < j <= i". The mixture of experts has its own file, test_moe.py.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, Olmo2Config, Olmo3Config, Qwen3Config, StableLmConfig
from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2RotaryEmbedding
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention, Gemma3MLP, Gemma3RMSNorm, Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.olmo2.modeling_olmo2 import Olmo2Attention, Olmo2RotaryEmbedding
from transformers.models.olmo3.modeling_olmo3 import Olmo3Attention, Olmo3RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Attention,
    Qwen3MLP,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.stablelm.modeling_stablelm import StableLmAttention, StableLmRotaryEmbedding

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
SMALL_ARGS = {"window": 3, "block": 2, "topk": 3, "q_lora_rank": 24, "kv_lora_rank": 16, "o_groups": 2, "o_lora_rank": 16}  # overrides of registry defaults that
# would make a tiny test vacuous (or too wide)
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
@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_gated_mlps_match_qwen3_and_gemma3(name, d_ff):
    ours = build(name, d_ff=d_ff)
    config = dataclasses.replace(CONFIG, d_ff=d_ff)
    theirs = Qwen3MLP(hf_config(config)) if name == "swiglu" else Gemma3MLP(gemma3_config(config))
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


# --- Gemma, OLMo and partial-rotary pieces --------------------------------------------------------------------

GEMMA_NORM = Call("rmsnorm", (("zero_centered", True),))


def settings(**changes) -> ModelConfig:
    """CONFIG with some settings changed, its rope completed afresh (dataclasses.replace would keep CONFIG's theta)."""
    kept = {f.name: getattr(CONFIG, f.name) for f in dataclasses.fields(CONFIG) if f.name != "rope"}
    return ModelConfig(**(kept | changes))


@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_zero_centered_rmsnorm_matches_gemma3(dim, scale):
    """x / rms(x) * (1 + w), with w well away from 0 so that w alone could not pass."""
    ours = RMSNorm(dim, 1e-6, zero_centered=True)
    torch.nn.init.normal_(ours.weight, mean=0.5, std=0.3)
    theirs = Gemma3RMSNorm(dim, eps=1e-6)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, dim) * scale
    close(ours(x), theirs(x))


def gemma3_config(config: ModelConfig, **overrides) -> Gemma3TextConfig:
    """A Gemma3TextConfig of the same sizes (every layer global unless `layer_types` says), eager attention."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    return Gemma3TextConfig(**{
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff, "num_hidden_layers": 1,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "rms_norm_eps": config.norm_eps, "layer_types": ["full_attention"], "attn_implementation": "eager",
        "rope_parameters": {"full_attention": dict(rope), "sliding_attention": dict(rope)}, **overrides,
    })




def attention_mask(length: int, window: int | None = None) -> torch.Tensor:
    """The additive (1, 1, T, T) mask transformers' eager attention takes: 0 where query i sees key j, -inf elsewhere."""
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    visible = (j <= i) & (i - j < window) if window else j <= i
    return torch.zeros(length, length).masked_fill(~visible, float("-inf"))[None, None]


def hf_attention(theirs, rotary, x: torch.Tensor, window: int | None = None, **rotary_args) -> torch.Tensor:
    """A transformers attention module's output on x, its rotary module's tables, and a causal (windowed) mask."""
    positions = torch.arange(x.shape[1])[None]
    out, _ = theirs.eval()(x, position_embeddings=rotary(x, positions, **rotary_args), attention_mask=attention_mask(x.shape[1], window))
    return out


@pytest.mark.parametrize("query_pre_attn_scalar", [16, 64, 256])
@pytest.mark.parametrize("window", [None, 3], ids=["global", "sliding"])
def test_attention_with_scale_and_zero_centered_qk_norm_matches_gemma3(query_pre_attn_scalar, window):
    """Per-head (1 + w) QK-norm, RoPE, logits scaled by query_pre_attn_scalar^-1/2 (not head_dim^-1/2)."""
    config = settings(norm=GEMMA_NORM, rope_theta=1e4)
    ours = build("sliding" if window else "global", config, scale=query_pre_attn_scalar ** -0.5, **({"window": window} if window else {}))
    layer_type = "sliding_attention" if window else "full_attention"
    hf = gemma3_config(config, query_pre_attn_scalar=query_pre_attn_scalar, layer_types=[layer_type], sliding_window=window or 4096)
    theirs = Gemma3Attention(hf, 0)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 13, config.d_model)
    close(mix(ours, x), hf_attention(theirs, Gemma3RotaryEmbedding(hf), x, window, layer_type=layer_type))


@pytest.mark.parametrize("softcap", [0.0, 1.0, 5.0])
@pytest.mark.parametrize("window", [None, 3], ids=["global", "sliding"])
def test_softcapped_attention_matches_gemma2(softcap, window):
    """c tanh(s / c) on the scaled logits before the mask and softmax (Gemma 2; transformers' Gemma 3 never applies it)."""
    config = settings(qk_norm="none", rope_theta=1e4)
    ours = build("sliding" if window else "global", config, scale=32 ** -0.5, softcap=softcap, **({"window": window} if window else {}))
    hf = Gemma2Config(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff, num_hidden_layers=1,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, rope_theta=1e4,
        query_pre_attn_scalar=32, attn_logit_softcapping=softcap or None, attn_implementation="eager",
        layer_types=["sliding_attention" if window else "full_attention"], sliding_window=window or 4096,
    )
    theirs = Gemma2Attention(hf, 0)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 13, config.d_model)
    expected = hf_attention(theirs, Gemma2RotaryEmbedding(hf), x, window)
    close(mix(ours, x), expected)
    if softcap:  # the cap bites at these logits: uncapped attention is far off
        uncapped = build("sliding" if window else "global", config, scale=32 ** -0.5, **({"window": window} if window else {}))
        uncapped.load_state_dict(ours.state_dict())
        assert (mix(uncapped, x) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("family", ["olmo2", "olmo3"])
def test_projection_qk_norm_attention_matches_olmo(family, n_kv_heads):
    """RMSNorm over the whole q and k projections (H * head_dim wide) before the head split and RoPE."""
    config = settings(n_kv_heads=n_kv_heads, qk_norm="projection", rope_theta=1e4)
    ours = build("global", config)
    assert ours.q_norm.weight.shape == (config.n_heads * config.head_dim,)
    common = dict(vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff, num_hidden_layers=1,
                  num_attention_heads=config.n_heads, num_key_value_heads=n_kv_heads, rms_norm_eps=config.norm_eps,
                  attn_implementation="eager")
    if family == "olmo2":
        hf = Olmo2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
        theirs, rotary, args = Olmo2Attention(hf, 0), Olmo2RotaryEmbedding(hf), {}
    else:
        rope = {"rope_type": "default", "rope_theta": 1e4}
        hf = Olmo3Config(**common, layer_types=["full_attention"],
                         rope_parameters={"full_attention": rope, "sliding_attention": dict(rope)})
        theirs, rotary, args = Olmo3Attention(hf, 0), Olmo3RotaryEmbedding(hf), {"layer_type": "full_attention"}
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 13, config.d_model)
    close(mix(ours, x), hf_attention(theirs, rotary, x, **args))


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_partial_rotary_attention_matches_stablelm(fraction):
    """RoPE on the first fraction of each head's dimensions, the rest unrotated (StableLM, no QK-norm, no biases)."""
    rope = complete(Call("rope", (("theta", 1e4), ("fraction", fraction))), "position", CONFIG)
    config = dataclasses.replace(CONFIG, qk_norm="none")
    ours = build("global", config, rope=rope)
    hf = StableLmConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff, num_hidden_layers=1,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads, attn_implementation="eager",
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": fraction},
    )
    theirs = StableLmAttention(hf, 0)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 13, config.d_model)
    close(mix(ours, x), hf_attention(theirs, StableLmRotaryEmbedding(hf), x))
