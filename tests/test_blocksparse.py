"""Block-sparse attention (local + global + strided blocks) against a dense masked softmax written here from the
definition of the pattern, position by position: values and gradients, the soft-capped form, the flex_attention
form, the attended pairs and the cache, the work done, and bad patterns refused where written."""
from __future__ import annotations

import math

import pytest
import torch
from test_analysis import TINY
from test_components import CONFIG, build, close, mix
from torch.utils.flop_counter import FlopCounterMode

import nanollm
from nanollm import ArchError
from nanollm.components.attention.blocksparse import Pattern, attend_flex, attend_gathered

# (block, local, global, stride, length): ragged lengths, local 0 with global blocks, strides, one block, GQA below
PATTERNS = [
    (4, 2, 1, 0, 23),
    (4, 1, 0, 0, 16),
    (5, 0, 2, 0, 27),
    (3, 2, 0, 3, 31),
    (8, 3, 2, 2, 40),
    (16, 4, 1, 0, 9),
    (1, 3, 2, 0, 12),
]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def visible(block: int, local: int, leading: int, stride: int, length: int) -> torch.Tensor:
    """Whether query q sees key k, entry by entry: k <= q, and k's block is among q's local blocks, a global block, or
    a multiple of stride blocks back."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    for q in range(length):
        for k in range(q + 1):
            back = q // block - k // block
            mask[q, k] = back < local or k // block < leading or (stride > 0 and back % stride == 0)
    return mask


def dense_reference(q, k, v, mask, softcap: float = 0.0) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) (soft-capped) + mask) V over the whole T x T square."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


def qkv(length: int, heads: int = 4, kv_heads: int = 2, width: int = 16):
    q = torch.randn(2, heads, length, width, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, length, width, requires_grad=True) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("block,local,leading,stride,length", PATTERNS)
def test_block_sparse_equals_the_dense_masked_softmax_with_gradients(block, local, leading, stride, length, kv_heads):
    q, k, v = qkv(length, kv_heads=kv_heads)
    ours = attend_gathered(q, k, v, Pattern(block, local, leading, stride), None, 0.0)
    reference = dense_reference(q, k, v, visible(block, local, leading, stride, length))
    close(ours, reference)
    probe = torch.randn_like(reference)
    expected = torch.autograd.grad((reference * probe).sum(), (q, k, v))
    for mine, theirs in zip(torch.autograd.grad((ours * probe).sum(), (q, k, v)), expected):
        close(mine, theirs)


def test_soft_capped_block_sparse_equals_the_dense_masked_softmax():
    q, k, v = qkv(29)
    close(attend_gathered(q, k, v, Pattern(4, 2, 1, 3), None, 5.0), dense_reference(q, k, v, visible(4, 2, 1, 3, 29), softcap=5.0))


@pytest.mark.parametrize("block,local,leading,stride", [(64, 2, 1, 0), (32, 1, 2, 3), (128, 1, 0, 0)])
def test_flex_attention_form_equals_the_gathered_form(block, local, leading, stride):
    """The GPU path, forward on CPU: 300 positions over blocks smaller and larger than flex's 128."""
    q, k, v = (t.detach() for t in qkv(300))
    pattern = Pattern(block, local, leading, stride)
    with torch.no_grad():
        close(attend_flex(q, k, v, pattern, None, 0.0), attend_gathered(q, k, v, pattern, None, 0.0))


@pytest.mark.parametrize("block,local,leading,stride,length", PATTERNS + [(7, 2, 3, 4, 100), (2, 0, 1, 5, 61)])
def test_attended_pairs_and_cache_count_the_dense_mask(block, local, leading, stride, length):
    pattern = Pattern(block, local, leading, stride)
    assert pattern.attended_pairs(length) == int(visible(block, local, leading, stride, length).sum())
    # the cache: the keys before `length` that some later query attends (checked over the next (local + 2) blocks and a stride)
    later = visible(block, local, leading, stride, length + block * (local + 2 + stride))[length:, :length]
    assert pattern.cache_positions(length) == int(later.any(dim=0).sum())


def test_analysis_counts_the_patterns_pairs():
    seq_len, heads, head_dim = 1000, 4, 32
    full = nanollm.compile(TINY + "global").analyze(seq_len)
    sparse = nanollm.compile(TINY + "blocksparse(64, 2, global=1)").analyze(seq_len)
    pairs = int(visible(64, 2, 1, 0, seq_len).sum())
    saved = 2 * heads * (seq_len * (seq_len + 1) // 2 - pairs) * 2 * head_dim
    assert (full.flops_per_token_fwd - sparse.flops_per_token_fwd) * seq_len == pytest.approx(saved, rel=1e-12)
    assert sparse.cache_bytes_per_token * seq_len == 2 * (2 * 2 * head_dim) * Pattern(64, 2, 1, 0).cache_positions(seq_len)


def test_work_scales_with_the_blocks_kept():
    """What the CPU path multiplies: the kept blocks, not T x T (FlopCounterMode on the meta device, where SDPA
    runs as its two matmuls over the gathered shapes)."""
    length, block, heads, width = 1024, 64, 4, 16
    q, k, v = (t.detach().to("meta") for t in qkv(length, heads=heads, kv_heads=heads, width=width))
    counts = {}
    for local in (1, 2, 4):
        with FlopCounterMode(display=False) as counter:
            attend_gathered(q, k, v, Pattern(block, local, 0, 0), None, 0.0)
        counts[local] = counter.get_total_flops()
    assert counts[1] == 2 * 2 * heads * length * block * 2 * width  # batch 2: each query block against its own block
    assert counts[2] == 2 * counts[1] and counts[4] == 4 * counts[1]


def test_block_sparse_mixer_trains_and_is_causal():
    module = build("blocksparse", block=3, local=1, **{"global": 1})
    x = torch.randn(2, 10, CONFIG.d_model, requires_grad=True)
    out = mix(module, x)
    changed = x.detach().clone()
    changed[:, 7] += 1.0
    moved = (mix(module, changed) - out).abs().amax(dim=(0, 2)) > 0
    assert moved.tolist() == [False] * 7 + [True, True, False]  # position 7 reaches 7 and 8 in its block (6..8), not block 3 (9)
    out.square().sum().backward()
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("text, col, message", [
    ("blocksparse(0)", 13, "blocksparse: block must be positive, got 0"),
    ("blocksparse(8, local=0, global=0)", 1, "local=0 with global=0 and no stride"),
    ("blocksparse(8, local=-1)", 22, "blocksparse: local must be at least 0"),
    ("blocksparse(8, stride=2.5)", 23, "whole number"),
])
def test_bad_patterns_are_refused_where_written(text, col, message):
    with pytest.raises(ArchError) as raised:
        nanollm.compile(text)
    assert message in raised.value.message
    assert (raised.value.pos.line, raised.value.pos.col) == (1, col)
