"""DeepSeek-V4 from transformers: its attention layer by layer type against DeepseekV4Attention (window, CSA, HCA) at 1e-5,
the accounting by closed forms, bad arguments; whole tiny DeepseekV4ForCausalLM models via from_hf (mHC, hash-routed and
sqrt(softplus) MoE layers) and the published DeepSeek-V4-Flash config's .arch and parameter count."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_components import build, close, mix
from test_families import assert_same_logits, hf_logits, token_ids
from torch.utils.flop_counter import FlopCounterMode
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention, DeepseekV4RotaryEmbedding

import nanollm
from nanollm.cli import main
from nanollm.decode import Decoder
from nanollm.hf import arch_from_config, load_config
from nanollm.hf.deepseek_v4 import LAYER_TYPES, attention_call
from nanollm.ir import ModelConfig

LENGTH = 24  # past the window (5), past both rates (2 and 8): 12 CSA entries and 3 HCA ones, more CSA ones than topk (3)
# Tiny V4 settings: half of each 16-wide head rotates (the last 8 dimensions); the compressed layers' RoPE is YaRN over a
# 16-token original context at another base, as DeepSeek-V4's.
V4 = dict(vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
          head_dim=16, q_lora_rank=24, partial_rotary_factor=0.5, sliding_window=5, o_groups=2, o_lora_rank=12, index_n_heads=8,
          index_head_dim=16, index_topk=3, rope_theta=1e3, compress_rope_theta=4e4, layer_types=list(LAYER_TYPES),
          compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 8}, rms_norm_eps=1e-6,
          rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, n_routed_experts=4,
          num_experts_per_tok=2, max_position_embeddings=64)


def v4_config(**overrides) -> DeepseekV4Config:
    """The tiny DeepseekV4Config, eager attention."""
    return DeepseekV4Config(**copy.deepcopy({**V4, **overrides}), attn_implementation="eager")


def settings(hf: DeepseekV4Config) -> ModelConfig:
    """nanollm's model settings of the tiny config (widths and the norm epsilon)."""
    return ModelConfig(vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_heads=hf.num_attention_heads, n_kv_heads=1, head_dim=hf.head_dim,
                       norm_eps=hf.rms_norm_eps, seq_len=64)


def pair(layer_type: str, **overrides) -> tuple[torch.nn.Module, DeepseekV4Attention, DeepseekV4RotaryEmbedding]:
    """Our `compressed` attention of a layer type, random (sinks and position biases too), and transformers' with its weights."""
    hf = v4_config(**overrides)
    config = settings(hf)
    ours = build("compressed", config, **attention_call(hf, config, layer_type).kwargs())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.endswith(("sinks", "position_bias")):
                param.normal_(std=1.0)
    theirs = DeepseekV4Attention(hf, LAYER_TYPES.index(layer_type)).eval()
    mine = ours.state_dict()
    theirs.load_state_dict({hf_name: mine[name] for name, hf_name in ours.hf_weights().items()}, strict=True)
    return ours, theirs, DeepseekV4RotaryEmbedding(hf)


def sliding_mask(length: int, window: int) -> torch.Tensor:
    """The additive (1, 1, T, T) mask transformers' eager attention takes: query i sees key j iff i - window < j <= i."""
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    return torch.zeros(length, length).masked_fill(~((j <= i) & (i - j < window)), float("-inf"))[None, None]


@torch.no_grad()
def hf_attention(theirs: DeepseekV4Attention, rotary: DeepseekV4RotaryEmbedding, x: torch.Tensor) -> torch.Tensor:
    """transformers' attention output on x, no cache: its rope types' tables and the sliding mask, as DeepseekV4Model passes them."""
    batch, length, _ = x.shape
    positions = torch.arange(length)[None].expand(batch, -1)
    tables = {label: rotary(x, positions, layer_type=label) for label in ("main", "compress")}
    mask = sliding_mask(length, theirs.sliding_window).expand(batch, -1, -1, -1)
    out, _ = theirs(x, position_embeddings=tables, position_ids=positions, attention_mask=mask)
    return out


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_compressed_attention_matches_transformers_per_layer_type(layer_type):
    """Every layer type of DeepseekV4Attention: the window with sinks, K = V and inverse RoPE; CSA; HCA; to 1e-5."""
    torch.manual_seed(0)
    ours, theirs, rotary = pair(layer_type)
    x = torch.randn(2, LENGTH, 64)
    expected = hf_attention(theirs, rotary, x)
    close(mix(ours, x), expected)
    if ours.compressor is not None:  # the compressed entries changed the output: dropping them does not match
        ours.compressor, ours.indexer = None, None
        assert (mix(ours, x) - expected).abs().max() > 1e-2
    if ours.indexer is not None:  # the indexer's choice mattered: every ended entry instead of the top 3 does not match
        ours.topk = LENGTH
        assert (mix(ours, x) - expected).abs().max() > 1e-2


TINY = ("vocab_size = 256\nd_model = 64\nn_heads = 4\nn_kv_heads = 1\nhead_dim = 16\n"
        "rope = rope(fraction=0.5, placement=last, interleaved=true)\n")
SIZES = dict(d=64, heads=4, head_dim=16, q=16, groups=2, o_rank=8, index_heads=2, index_dim=8)


def window_pairs(seq_len: int, window: int) -> int:
    """(query, key) pairs of a causal window: each position sees itself and up to window - 1 before it."""
    return sum(min(t + 1, window) for t in range(seq_len))


def compressed_macs(seq_len: int, window: int, rate: int, overlap: bool, topk: int, d: int, heads: int, head_dim: int, q: int,
                    groups: int, o_rank: int, index_heads: int, index_dim: int) -> tuple[int, int]:
    """Closed-form multiply-accumulates of one `compressed` layer: (every matmul, the attention's scored pairs)."""
    wide = 2 if overlap else 1
    pooled = seq_len // rate * rate if rate else 0  # tokens of complete windows, all the compressors project
    matmuls = seq_len * (d * q + q * heads * head_dim + d * head_dim + heads * head_dim * o_rank + groups * o_rank * d)
    matmuls += 2 * pooled * d * wide * head_dim  # kv_proj and gate_proj
    if rate and topk:
        entries = seq_len // rate
        matmuls += 2 * pooled * d * wide * index_dim + seq_len * (q * index_heads * index_dim + d * index_heads)
        matmuls += seq_len * entries * index_heads * (index_dim + 1)  # relu(q . k) per head, then the weighted sum over heads
    pairs = window_pairs(seq_len, window) + sum(min((t + 1) // rate, topk or seq_len) if rate else 0 for t in range(seq_len))
    return matmuls, heads * pairs * 2 * head_dim


CALLS = {
    "window": (dict(window=4, rate=0, overlap=False, topk=0), "rate=0"),
    "csa": (dict(window=4, rate=2, overlap=True, topk=3), "rate=2, topk=3"),
    "hca": (dict(window=4, rate=8, overlap=False, topk=0), "rate=8, overlap=false, topk=0"),
}


@pytest.mark.parametrize("seq_len", [30, 33])
@pytest.mark.parametrize("case", CALLS.values(), ids=CALLS.keys())
def test_compressed_flops_and_cache_match_closed_forms(case, seq_len):
    """The analysis counts every projection, the indexer's scoring of all entries, and attention over the pairs really scored:
    the window's and the entries each query sees (all ended ones, or topk). FlopCounterMode agrees on everything but
    attention, which it counts at SDPA's full shape, every query against every key. The cache: the window's one K = V head,
    every entry, the open window."""
    shape, written = case
    arch = (TINY + f"compressed(window=4, {written}, index_heads=2, index_head_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=8) "
            "ffn=none")
    compiled = nanollm.compile(arch)
    analysis = compiled.analyze(seq_len)
    matmuls, attention = compressed_macs(seq_len, **shape, **SIZES)
    assert analysis.layers[0].flops_per_token_fwd * seq_len == 2 * (matmuls + attention)
    with FlopCounterMode(display=False) as counter:
        compiled.graph(torch.zeros(1, seq_len, dtype=torch.long, device="meta"))
    rate, index = shape["rate"], shape["topk"] > 0
    entries = seq_len // rate if rate else 0
    every_pair = 4 * seq_len * (seq_len + entries) * 2 * 16  # SDPA's shape: every query against every key and entry
    assert counter.get_total_flops() == 2 * (matmuls + every_pair + seq_len * 64 * 256)
    open_tokens = seq_len % rate if rate else 0
    wide = 2 if shape["overlap"] else 1
    expected = 16 * min(4, seq_len)
    if rate:
        expected += 16 * entries + 2 * (open_tokens * wide * 16 + (rate * 16 if shape["overlap"] else 0))
        if index:
            expected += 8 * entries + 2 * (open_tokens * wide * 8 + (rate * 8 if shape["overlap"] else 0))
    assert analysis.cache_bytes_per_token * seq_len == pytest.approx(2 * expected)


@pytest.mark.parametrize("text, message", [
    ("compressed(o_groups=3, q_lora_rank=16, o_lora_rank=8)", "o_groups = 3 does not divide heads = 4"),
    ("compressed(rope=nope, q_lora_rank=16, o_lora_rank=8, o_groups=2)", "needs a rotary position encoding"),
    ("compressed(index_head_dim=4, q_lora_rank=16, o_lora_rank=8, o_groups=2)", "do not fit an indexer head"),
    ("compressed(rate=-1, q_lora_rank=16, o_lora_rank=8, o_groups=2)", "rate"),
])
def test_compressed_bad_arguments_are_positioned_errors(text, message):
    with pytest.raises(nanollm.ArchError, match=message) as error:
        nanollm.compile(TINY + text)
    assert ":7:" in str(error.value)


def test_compressed_trains_every_weight_but_the_indexers():
    """A training step reaches every weight of the window and the compressor; the indexer's choice is not differentiable."""
    model = nanollm.compile(TINY + "compressed(window=3, rate=2, topk=2, index_heads=2, index_head_dim=16, q_lora_rank=16, o_groups=2, "
                                   "o_lora_rank=8)").build()
    logits, _ = model(torch.randint(0, 256, (2, 12)))
    logits.logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        assert (param.grad is None) == (".indexer." in name), name



LAYERS = ("compressed(window=4, rate=0, {sizes}) ffn=none\ncompressed(window=4, rate=2, topk=3, {sizes}) ffn=none\n"
          "compressed(window=4, rate=8, overlap=false, topk=0, {sizes}) ffn=none\n").format(
    sizes="index_heads=8, index_head_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=8")  # 8 heads: no entries tied at a zero score


def test_each_decoding_step_gives_the_full_forward_logits():
    """A prompt, a chunk of 3 and then single tokens, each continuing from the window's ring, the entries and the pending
    projections: the full forward's logits at every position, windows closing inside a chunk and across steps."""
    compiled = nanollm.compile(TINY + LAYERS)
    torch.manual_seed(3)
    model = compiled.build().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("sinks", "position_bias")):
                param.normal_(std=1.0)
    decoder = Decoder(model, compiled.arch, context=64)
    sequence = torch.randint(0, 256, (2, 20))  # the second HCA entry closes at position 15, among the single steps
    with torch.no_grad():
        full, _ = model(sequence)
        states = decoder.states(2, sequence.shape[1])
        steps = [decoder.step(sequence[:, :9], 0, states), decoder.step(sequence[:, 9:12], 9, states)]
        steps += [decoder.step(sequence[:, t:t + 1], t, states) for t in range(12, sequence.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


# --- whole models -----------------------------------------------------------------------------------------------

CONFIGS = Path(__file__).parent / "fixtures" / "hf_configs"


def deepseek_v4(**overrides) -> DeepseekV4ForCausalLM:
    """A tiny DeepseekV4ForCausalLM: one layer of each type, a hash-routed MoE then two routed ones, every weight transformers
    leaves at a constant drawn (norms, sinks, position biases, mHC biases and scales, correction biases, a hash table of k
    distinct experts per token)."""
    torch.manual_seed(0)
    config = v4_config(mlp_layer_types=["hash_moe", "moe", "moe"], experts_implementation="eager", **overrides)
    model = DeepseekV4ForCausalLM(config).eval()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("tid2eid"):
                tensor.copy_(torch.stack([torch.randperm(config.n_routed_experts)[: config.num_experts_per_tok] for _ in tensor]))
            elif name.endswith(("norm.weight", "layernorm.weight")):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith(("sinks", "position_bias", "base", "hc_base", "e_score_correction_bias")):
                tensor.normal_(std=0.5)
            elif name.endswith(("scale", "hc_scale")):
                tensor.uniform_(0.5, 1.5)
    return model


def test_deepseek_v4_matches_transformers():
    """Window, CSA and HCA layers (window, rates and top-k shorter than the 40-token sequence), mHC streams and their head,
    the hash-routed MoE then the sqrt(softplus) one with its correction bias, all to 1e-5; decoding the imported model
    token by token gives its full forward's logits."""
    hf = deepseek_v4()
    arch = arch_from_config(hf.config)
    assert [(layer.mixer.kwargs()["rate"], layer.ffn.kwargs()["hash"]) for layer in arch.layers] == [(0, True), (2, False), (8, False)]
    ours = nanollm.from_hf(hf)
    expected = assert_same_logits(hf, ours)
    decoder, ids = Decoder(ours, arch, context=64), token_ids()
    with torch.no_grad():
        states = decoder.states(*ids.shape)
        steps = [decoder.step(ids[:, :30], 0, states)] + [decoder.step(ids[:, t:t + 1], t, states) for t in range(30, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=0, atol=1e-5)
    everything = deepseek_v4(index_topk=64)  # the same weights, every ended entry attended
    assert (expected - hf_logits(everything)).abs().max() > 1e-2


def test_deepseek_v4_flash_import_has_transformers_parameter_count(tmp_path):
    """The published DeepSeek-V4-Flash config: `nanollm import` writes the shipped .arch, which compiles to from_hf's IR, and
    its parameters are those of transformers' meta model (284B)."""
    out = tmp_path / "deepseek_v4_flash.arch"
    assert main(["import", str(CONFIGS / "deepseek-v4-flash.config.json"), "-o", str(out)]) == 0
    hf = load_config(CONFIGS / "deepseek-v4-flash.config.json")
    compiled = nanollm.compile(out)
    assert compiled.arch == arch_from_config(hf)
    shipped = Path(__file__).parent.parent / "archs/deepseek_v4_flash.arch"
    assert out.read_text().split("\n\n", 1)[1] == shipped.read_text().split("\n\n", 1)[1]
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(hf)
    assert compiled.analysis.params_total == sum(p.numel() for p in model.parameters()) == 284_332_230_231


@pytest.mark.parametrize("overrides, message", [
    ({"num_key_value_heads": 2}, "one K = V head"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"scoring_func": "tanh"}, "scoring_func"),
])
def test_deepseek_v4_configs_nanollm_cannot_reproduce_are_refused(overrides, message):
    with pytest.raises(nanollm.ArchError, match=message):
        arch_from_config(v4_config(**overrides))
