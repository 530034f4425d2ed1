"""Static analysis against closed-form formulas, FlopCounterMode, and fvcore on the whole graph."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from torch.utils.flop_counter import FlopCounterMode

import nanollm
import nanollm.analysis

ROOT = Path(__file__).parent.parent
TINY = "vocab_size = 512\nd_model = 64\nn_heads = 4\nn_kv_heads = 2\nhead_dim = 32\nd_ff = 96\n"


def qwen3_macs(seq_len: int, layers: int = 28, d: int = 1024, heads: int = 16, kv: int = 8, hd: int = 128, ff: int = 3072, vocab: int = 151936) -> int:
    """Closed-form forward multiply-accumulates of a tied Qwen3 over one causal sequence."""
    projections = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    mlp = 3 * d * ff
    attention = heads * (seq_len * (seq_len + 1) // 2) * 2 * hd  # QK^T and AV over the causal triangle
    return seq_len * (layers * (projections + mlp) + d * vocab) + layers * attention


def window_pairs(seq_len: int, window: int) -> int:
    """(query, key) pairs under a causal window, by definition."""
    return sum(min(window, t) for t in range(1, seq_len + 1))


@pytest.mark.parametrize("seq_len", [512, 4096])
def test_baseline_flops_match_the_closed_form(seq_len):
    analysis = nanollm.compile(ROOT / "archs/qwen3_0_6b.arch").analyze(seq_len)
    assert analysis.flops_per_token_fwd * seq_len == pytest.approx(2 * qwen3_macs(seq_len), rel=1e-13)
    assert analysis.flops_per_token_train == 3 * analysis.flops_per_token_fwd


def test_baseline_params_and_kv_cache():
    analysis = nanollm.compile(ROOT / "archs/qwen3_0_6b.arch").analysis
    assert analysis.params_total == 596_049_920 == analysis.params_active
    assert analysis.params_embedding == 151936 * 1024
    assert analysis.cache_bytes_per_token == 28 * 2 * 8 * 128 * 2
    assert analysis.n_layers == 28 and analysis.seq_len == 4096


def test_sliding_window_flops_count_only_the_window():
    seq_len, window = 1024, 100
    full = nanollm.compile(TINY + "n_layers = 2").analyze(seq_len)
    slid = nanollm.compile(TINY + "sliding(100); sliding").analyze(seq_len)
    saved_pairs = seq_len * (seq_len + 1) // 2 - window_pairs(seq_len, window)
    saved_flops = 2 * 2 * 4 * saved_pairs * (32 + 32)  # 2 layers, 4 heads, QK^T + AV
    assert (full.flops_per_token_fwd - slid.flops_per_token_fwd) * seq_len == pytest.approx(saved_flops, rel=1e-12)
    assert slid.cache_bytes_per_token == pytest.approx(2 * (2 * 2 * 32 * 2) * window / seq_len)
    short = nanollm.compile(TINY + "sliding(100); global").analyze(64)  # window longer than the sequence
    assert short.flops_per_token_fwd == nanollm.compile(TINY + "global; global").analyze(64).flops_per_token_fwd


def test_moe_counts_active_experts_only():
    seq_len = 128
    dense = nanollm.compile(TINY + "global ffn=swiglu(d_ff=32)").analyze(seq_len)
    moe = nanollm.compile(TINY + "global ffn=moe(top=3, experts=8, d_ff=32)").analyze(seq_len)
    router = 2 * 64 * 8
    assert moe.flops_per_token_fwd - dense.flops_per_token_fwd == pytest.approx(router + 2 * 2 * 3 * 64 * 32)
    expert = 3 * 64 * 32
    assert moe.params_total - dense.params_total == 64 * 8 + 7 * expert
    assert moe.params_active - dense.params_active == 64 * 8 + 2 * expert
    assert moe.layers[0].params - moe.layers[0].params_active == 5 * expert


def test_untied_head_is_counted_once():
    tied = nanollm.compile(TINY + "global").analyze(16)
    untied = nanollm.compile(TINY + "tie_embeddings = false\nglobal").analyze(16)
    assert untied.params_total - tied.params_total == 512 * 64
    assert untied.params_embedding == 2 * 512 * 64
    assert untied.flops_per_token_fwd == tied.flops_per_token_fwd


def test_layer_figures_add_up_to_the_totals():
    analysis = nanollm.compile(TINY + "repeat 2 < sliding(8); global ffn=moe(top=2, experts=4) >").analyze(64)
    head = 2 * 64 * 512
    assert sum(r.flops_per_token_fwd for r in analysis.layers) + head == pytest.approx(analysis.flops_per_token_fwd)
    embedding_and_norm = 512 * 64 + 64
    assert sum(r.params for r in analysis.layers) + embedding_and_norm == analysis.params_total
    assert [r.calls["mixer"].split("(")[0] for r in analysis.layers] == ["sliding", "global"] * 2
    assert analysis.layers[0].calls["mixer"].startswith("sliding(window=8, heads=4, kv_heads=2, head_dim=32, ")


def attention_flops(compiled: nanollm.Compiled, seq_len: int) -> int:
    """Attention score and AV FLOPs by our causal/window definition, from the IR."""
    config, total = compiled.config, 0
    for layer in compiled.arch.layers:
        window = layer.mixer.kwargs().get("window", seq_len)
        total += 2 * config.n_heads * window_pairs(seq_len, window) * 2 * config.head_dim
    return total


def test_matmul_flops_agree_exactly_with_flop_counter_mode():
    seq_len = 64
    compiled = nanollm.compile(TINY + "tie_embeddings = false\nrepeat 2 < sliding(8) ffn=moe(top=2, experts=4); global >")
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")

    def grouped_mm(a_shape, b_shape, *args, **kwargs):  # FlopCounterMode has no formula for it
        return 2 * a_shape[0] * a_shape[1] * b_shape[-1]

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: grouped_mm}) as counter:
        compiled.graph(ids)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    # On meta, SDPA runs as its math decomposition: two bmm per layer (4 layers) over the full T x T square.
    full_square = 4 * 2 * 2 * compiled.config.n_heads * seq_len * seq_len * compiled.config.head_dim
    assert counts["aten.bmm"] == full_square
    ours = compiled.analyze(seq_len).flops_per_token_fwd * seq_len
    assert round(ours) - attention_flops(compiled, seq_len) == counter.get_total_flops() - full_square


def test_whole_graph_fvcore_equals_the_per_component_count():
    seq_len = 128
    compiled = nanollm.compile(TINY + "repeat 3 < global ffn=moe(top=2, experts=4) >")
    handles = {
        **compiled.graph.get_submodule("layers.0.mixer").flop_handles(seq_len),
        **compiled.graph.get_submodule("layers.0.ffn").flop_handles(seq_len),
    }
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    whole = FlopCountAnalysis(compiled.graph, (ids,)).set_op_handle(**handles)
    whole.unsupported_ops_warnings(False).tracer_warnings("none")
    assert 2 * whole.total() / seq_len == compiled.analyze(seq_len).flops_per_token_fwd


def test_identical_layers_are_traced_once(monkeypatch):
    traced = []
    original = nanollm.analysis.count_macs
    monkeypatch.setattr(nanollm.analysis, "count_macs", lambda *args: traced.append(args) or original(*args))
    monkeypatch.setattr(nanollm.analysis, "_MACS", {})
    nanollm.compile(TINY + "n_layers = 2").analyze(32)
    two = len(traced)
    monkeypatch.setattr(nanollm.analysis, "_MACS", {})
    traced.clear()
    nanollm.compile(TINY + "n_layers = 12").analyze(32)
    assert len(traced) == two
    traced.clear()
    nanollm.compile(TINY + "n_layers = 7").analyze(32)  # every call already counted in this process
    assert traced == []


def test_activation_estimate_is_linear_in_length():
    compiled = nanollm.compile(TINY + "repeat 2 < sliding(8); global >")
    short, long = compiled.analyze(256).activation_bytes, compiled.analyze(512).activation_bytes
    assert short > 0 and 1.9 < long / short < 2.1  # no T x T score matrices in the estimate


@pytest.mark.parametrize("name", ["dense.arch", "moe_fine.arch"])
def test_activation_estimate_leaves_out_the_weights(name):
    """Backward keeps weights (often as views, like linear's weight.t()); they are not activations.

    These models' weights are hundreds of MB and one 64-token sequence's activations a few MB, so any
    weight counted would show as a length-independent term.
    """
    compiled = nanollm.compile(ROOT / "archs" / name)
    short, long = compiled.analyze(64).activation_bytes, compiled.analyze(512).activation_bytes
    assert 7.9 < long / short < 8.1  # a weight counted would add hundreds of MB to both: a ratio near 1.5


def test_analysis_allocates_no_weights():
    compiled = nanollm.compile(ROOT / "archs/hybrid_moe.arch")
    assert compiled.analysis.params_total > 0
    assert {p.device.type for p in compiled.graph.parameters()} == {"meta"}


def test_per_call_attention_overrides_change_exactly_their_layer():
    """heads, kv_heads, head_dim and qk_norm given on one call: that layer's parameters, FLOPs and cache follow them,
    the others keep the settings'; a soft-cap or another scale changes no product."""
    seq_len = 64
    base = nanollm.compile(TINY + "global; global").analyze(seq_len)
    wide = nanollm.compile(TINY + "global(heads=8, kv_heads=4, head_dim=16, qk_norm=none); global").analyze(seq_len)
    d, (heads, kv, hd) = 64, (8, 4, 16)
    projections = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    assert wide.layers[1] == base.layers[1]
    assert wide.layers[0].params == projections + 3 * d * 96 + 2 * d  # no q/k norms; the MLP and the two layer norms
    attention = heads * (seq_len * (seq_len + 1) // 2) * 2 * hd
    assert wide.layers[0].flops_per_token_fwd * seq_len == pytest.approx(2 * (seq_len * (projections + 3 * d * 96) + attention))
    assert wide.layers[0].cache_bytes_per_token == 2 * (2 * kv * hd)
    capped = nanollm.compile(TINY + "attn_softcap = 50.0\nattn_scale = 0.1\nglobal; global").analyze(seq_len)
    assert capped.flops_per_token_fwd == base.flops_per_token_fwd


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An empty meta tensor."""
    return torch.empty(shape, dtype=dtype, device="meta")


aten = torch.ops.aten
# (op, arguments, keyword arguments): operands laid out as a model's are (transposed heads, slices of them, broadcast
# weights, size-1 dimensions, channels-last, half precision beside fp32), for every rule of nanollm.shapes.
SHAPE_CASES = {
    "transposed times contiguous": (aten.mul.Tensor, lambda: (meta(2, 3, 4, 5).transpose(1, 2), meta(2, 4, 3, 5)), {}),
    "contiguous times transposed": (aten.mul.Tensor, lambda: (meta(2, 4, 3, 5), meta(2, 3, 4, 5).transpose(1, 2)), {}),
    "slice of transposed heads plus a broadcast vector": (aten.add.Tensor, lambda: (meta(2, 5, 3, 8).transpose(1, 2)[..., :4], meta(4)), {"alpha": 2}),
    "size-1 dimensions of equal strides": (aten.mul.Tensor, lambda: (meta(1, 6, 4).unsqueeze(2), meta(6, 1, 1)), {}),
    "an expanded operand first": (aten.sub.Tensor, lambda: (meta(3, 1, 5).expand(3, 4, 5), meta(4, 3, 5).transpose(0, 1)), {}),
    "channels-last operands": (aten.add.Tensor, lambda: (meta(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),) * 2, {}),
    "bf16 times fp32": (aten.mul.Tensor, lambda: (meta(2, 5, 3, 8, dtype=torch.bfloat16).transpose(1, 2), meta(5, 8)), {}),
    "bf16 times a number": (aten.mul.Scalar, lambda: (meta(4, 6, dtype=torch.bfloat16).t(), 0.5), {}),
    "integers times a float": (aten.mul.Tensor, lambda: (meta(5, dtype=torch.long), meta(3, 1)), {}),
    "positions minus positions": (aten.sub.Tensor, lambda: (meta(6, 1, dtype=torch.long), meta(6, dtype=torch.long)), {}),
    "integers plus integers twice": (aten.add.Tensor, lambda: (meta(6, dtype=torch.int32), meta(6, dtype=torch.long)), {"alpha": 2}),
    "bf16 times a CPU scalar tensor": (aten.mul.Tensor, lambda: (meta(3, 4, dtype=torch.bfloat16).t(), torch.tensor(2.5)), {}),
    "a CPU scalar tensor times a slice": (aten.mul.Tensor, lambda: (torch.tensor(3), meta(4, 6)[:, :3]), {}),
    "masks and masks": (aten.bitwise_and.Tensor, lambda: (meta(5, 1, dtype=torch.bool), meta(5, dtype=torch.bool)), {}),
    "masks or masks": (aten.bitwise_or.Tensor, lambda: (meta(5, 5, dtype=torch.bool).t(), meta(5, 5, dtype=torch.bool)), {}),
    "integers xor integers": (aten.bitwise_xor.Tensor, lambda: (meta(5, dtype=torch.int32), meta(2, 1, dtype=torch.long)), {}),
    "power of a transposed matrix": (aten.pow.Tensor_Scalar, lambda: (meta(4, 6).t(), 2), {}),
    "negated bf16 slice of transposed heads": (aten.neg.default, lambda: (meta(1, 5, 3, 8, dtype=torch.bfloat16).transpose(1, 2)[..., 4:],), {}),
    "rsqrt": (aten.rsqrt.default, lambda: (meta(3, 4, 1),), {}),
    "silu of a transposed matrix": (aten.silu.default, lambda: (meta(4, 6).t(),), {}),
    "sigmoid": (aten.sigmoid.default, lambda: (meta(2, 3),), {}),
    "exp of a slice": (aten.exp.default, lambda: (meta(4, 6)[:, 1:3],), {}),
    "sqrt": (aten.sqrt.default, lambda: (meta(5),), {}),
    "tanh gelu": (aten.gelu.default, lambda: (meta(2, 7),), {"approximate": "tanh"}),
    "softplus": (aten.softplus.default, lambda: (meta(2, 7), 1.0, 20.0), {}),
    "relu": (aten.relu.default, lambda: (meta(2, 7, dtype=torch.bfloat16),), {}),
    "integers below a number": (aten.lt.Scalar, lambda: (meta(6, dtype=torch.long), 3), {}),
    "equal tensors of two dtypes": (aten.eq.Tensor, lambda: (meta(6, dtype=torch.long), meta(2, 1)), {}),
    "greater than a number": (aten.gt.Scalar, lambda: (meta(4, 6).t(), 0.0), {}),
    "at most": (aten.le.Tensor, lambda: (meta(4, 1, dtype=torch.long), meta(5, dtype=torch.long)), {}),
    "not equal to a number": (aten.ne.Scalar, lambda: (meta(3, 3), 0), {}),
    "in-place add": (aten.add_.Tensor, lambda: (meta(3, 4), meta(4)), {}),
    "in-place add of a number": (aten.add_.Scalar, lambda: (meta(3, 4), 1e-6), {}),
    "in-place scale": (aten.mul_.Tensor, lambda: (meta(3, 4).t(), meta(3)), {}),
    "in-place scale by a number": (aten.mul_.Scalar, lambda: (meta(3, 4), 2), {}),
    "mean over the last dimension": (aten.mean.dim, lambda: (meta(2, 5, 8), [-1], True), {}),
    "mean over two dimensions": (aten.mean.dim, lambda: (meta(2, 5, 8), [0, 2]), {}),
    "matmul by a transposed weight": (aten.mm.default, lambda: (meta(6, 4), meta(5, 4).t()), {}),
    "batched matmul of transposed keys": (aten.bmm.default, lambda: (meta(3, 6, 4), meta(3, 6, 4).transpose(1, 2)), {}),
    "cat of slices of transposed heads": (aten.cat.default, lambda: ([meta(1, 5, 3, 8).transpose(1, 2)[..., 4:], meta(1, 5, 3, 8).transpose(1, 2)[..., :4]], -1), {}),
    "cat promoting dtypes": (aten.cat.default, lambda: ([meta(2, 3, dtype=torch.bfloat16), meta(4, 3)],), {}),
    "embedding": (aten.embedding.default, lambda: (meta(10, 4), meta(2, 5, dtype=torch.long)), {}),
    "where with a broadcast mask": (aten.where.self, lambda: (meta(5, 5, dtype=torch.bool), meta(2, 5, 3, 5).transpose(1, 2), meta()), {}),
    "tril": (aten.tril.default, lambda: (meta(3, 5, 5),), {}),
    "triu above the diagonal": (aten.triu.default, lambda: (meta(5, 5, dtype=torch.bool), 1), {}),
    "zeros": (aten.zeros.default, lambda: ([2, 3],), {"device": torch.device("meta")}),
    "ones of a dtype": (aten.ones.default, lambda: ([4],), {"dtype": torch.bool, "device": torch.device("meta")}),
    "new zeros": (aten.new_zeros.default, lambda: (meta(2, dtype=torch.bfloat16), [3, 1]), {}),
    "new empty of a dtype": (aten.new_empty.default, lambda: (meta(2), [5]), {"dtype": torch.float32}),
    "arange": (aten.arange.default, lambda: (7,), {"device": torch.device("meta")}),
    "identity": (aten.eye.default, lambda: (5,), {"device": torch.device("meta"), "dtype": torch.float32}),
    "scalar tensor": (aten.scalar_tensor.default, lambda: (3,), {"device": torch.device("meta")}),
    "safe softmax": (aten._safe_softmax.default, lambda: (meta(2, 4, 4), -1), {}),
    "unsafe view": (aten._unsafe_view.default, lambda: (meta(2, 3, 4), [6, 4]), {}),
    "contiguous copy of transposed heads": (aten.clone.default, lambda: (meta(2, 5, 3, 8).transpose(1, 2),), {"memory_format": torch.contiguous_format}),
    "copy of a contiguous tensor": (aten.clone.default, lambda: (meta(2, 5),), {}),
    "bf16 silu times a bf16 slice": (aten.mul.Tensor, lambda: (meta(4, 6, dtype=torch.bfloat16), meta(4, 12, dtype=torch.bfloat16)[:, 6:]), {}),
    "bf16 slice plus fp32 transposed": (aten.add.Tensor, lambda: (meta(2, 8, 6, dtype=torch.bfloat16)[..., :3], meta(2, 3, 8).transpose(1, 2)), {}),
    "division by a CPU scalar tensor": (aten.div.Tensor, lambda: (meta(3, 4).t(), torch.tensor(3)), {}),
    "integer division": (aten.div.Tensor, lambda: (meta(5, dtype=torch.long), meta(2, 1, dtype=torch.long)), {}),
    "floor division": (aten.floor_divide.default, lambda: (meta(5, dtype=torch.long), torch.tensor(2)), {}),
    "sum of bools": (aten.sum.default, lambda: (meta(4, 3, dtype=torch.bool),), {}),
    "sum of bf16 in fp32": (aten.sum.default, lambda: (meta(4, 3, dtype=torch.bfloat16),), {"dtype": torch.float32}),
    "sum over a dim of integers": (aten.sum.dim_IntList, lambda: (meta(4, 3, dtype=torch.int32), [0]), {}),
    "sum over dims, kept, of a transposed matrix": (aten.sum.dim_IntList, lambda: (meta(2, 4, 3).transpose(1, 2), [-1], True), {}),
    "cumsum of integers": (aten.cumsum.default, lambda: (meta(4, 3, dtype=torch.int32), 0), {}),
    "cumsum in a dtype": (aten.cumsum.default, lambda: (meta(4, 3), -1), {"dtype": torch.float64}),
    "softmax": (aten._softmax.default, lambda: (meta(2, 3, 8), -1, False), {}),
    "top k": (aten.topk.default, lambda: (meta(6, 8), 3), {}),
    "top k along dim 0 of a transposed matrix": (aten.topk.default, lambda: (meta(8, 6).t(), 2, 0, False), {}),
    "stable sort": (aten.sort.stable, lambda: (meta(6, dtype=torch.int32),), {"stable": True}),
    "descending sort along dim 0": (aten.sort.stable, lambda: (meta(6, 4),), {"stable": True, "dim": 0, "descending": True}),
    "gather": (aten.gather.default, lambda: (meta(6, 8), 1, meta(6, 2, dtype=torch.long)), {}),
    "gather from a transposed matrix": (aten.gather.default, lambda: (meta(8, 6).t(), 0, meta(3, 8, dtype=torch.long)), {}),
    "index select": (aten.index_select.default, lambda: (meta(6, 8), 0, meta(10, dtype=torch.long)), {}),
    "index select of a transposed matrix": (aten.index_select.default, lambda: (meta(8, 6).t(), 1, meta(3, dtype=torch.long)), {}),
    "index add": (aten.index_add_.default, lambda: (meta(6, 8), 0, meta(10, dtype=torch.long), meta(10, 8)), {}),
    "scatter add": (aten.scatter_add_.default, lambda: (meta(6, 8), 1, meta(6, 3, dtype=torch.long), meta(6, 3)), {}),
    "zeros like a transposed matrix": (aten.zeros_like.default, lambda: (meta(4, 6).t(),), {}),
    "ones like, of a dtype": (aten.ones_like.default, lambda: (meta(4, 6, dtype=torch.bfloat16),), {"dtype": torch.float64}),
    "stack": (aten.stack.default, lambda: ([meta(3, 4), meta(3, 4, dtype=torch.float64)], 1), {}),
    "stack at the end": (aten.stack.default, lambda: ([meta(3), meta(3)], -1), {}),
    "grouped matmul": (aten._grouped_mm.default, lambda: (meta(10, 8, dtype=torch.bfloat16), meta(4, 8, 6, dtype=torch.bfloat16).transpose(1, 2)
                                                         .contiguous().transpose(1, 2), meta(4, dtype=torch.int32)), {}),
    "rows by an index": (aten.index.Tensor, lambda: (meta(6, 8), [meta(2, 5, dtype=torch.long)]), {}),
    "stack of transposed matrices": (aten.stack.default, lambda: ([meta(3, 4).t(), meta(3, 4).t()], 1), {}),
    "stack of slices of heads": (aten.stack.default, lambda: ([meta(1, 5, 3, 8)[..., 1::2], meta(1, 5, 3, 8)[..., 0::2]], -1), {}),
    "not of a transposed mask": (aten.bitwise_not.default, lambda: (meta(4, 6, dtype=torch.bool).t(),), {}),
    "masked fill by a broadcast mask": (aten.masked_fill.Scalar, lambda: (meta(2, 5, 5), meta(5, 5, dtype=torch.bool), float("-inf")), {}),
    "scatter": (aten.scatter.src, lambda: (meta(6, 8), 1, meta(6, 3, dtype=torch.long), meta(6, 3)), {}),
    "addmm by a transposed weight": (aten.addmm.default, lambda: (meta(5), meta(6, 4), meta(5, 4).t()), {}),
    "clamp of a slice": (aten.clamp.default, lambda: (meta(4, 6)[:, 1:3], -1.0, 1.0), {}),
    "clamp from below of bf16": (aten.clamp.default, lambda: (meta(4, 6, dtype=torch.bfloat16), 0), {}),
    "clamp_min of a transposed matrix": (aten.clamp_min.default, lambda: (meta(4, 6).t(), 1e-6), {}),
    "remainder by a number": (aten.remainder.Scalar, lambda: (meta(6, dtype=torch.long), 4), {}),
    "remainder by a tensor": (aten.remainder.Tensor, lambda: (meta(6, 1, dtype=torch.long), meta(3, dtype=torch.long)), {}),
    "a number to a tensor's power": (aten.pow.Scalar, lambda: (2.0, meta(4, 6).t()), {}),
    "padding of a transposed matrix": (aten.constant_pad_nd.default, lambda: (meta(2, 4, 3).transpose(1, 2), [1, 2]), {}),
    "padding two dims with a value": (aten.constant_pad_nd.default, lambda: (meta(2, 3, 4), [1, 0, 0, 2], 1.0), {}),
    "any along a dim of a transposed mask": (aten.any.dim, lambda: (meta(3, 4, dtype=torch.bool).t(), 1), {}),
    "mean of transposed bf16 heads": (aten.mean.dim, lambda: (meta(2, 4, 3, dtype=torch.bfloat16).transpose(1, 2), [-1], True), {}),
    "cumsum of a transposed tensor": (aten.cumsum.default, lambda: (meta(2, 4, 3).transpose(1, 2), 1), {}),
    "masked fill of a slice": (aten.masked_fill.Scalar, lambda: (meta(1, 16, 1, 64)[..., :1], meta(16, 1, 1, dtype=torch.bool), -1.0), {}),
    "a number to an integer tensor's power": (aten.pow.Scalar, lambda: (0.5, meta(6, dtype=torch.long)), {}),
    "cat with an empty part": (aten.cat.default, lambda: ([meta(1, 2, 8, 6)[..., :4], meta(1, 2, 8, 2), meta(1, 2, 8, 0)], -1), {}),
}


@pytest.mark.parametrize("case", SHAPE_CASES)
def test_each_meta_shape_rule_gives_the_output_torchs_kernel_gives(case):
    from nanollm.shapes import RULES

    op, arguments, kwargs = SHAPE_CASES[case]
    assert layouts(RULES[op](*arguments(), **kwargs)) == layouts(op(*arguments(), **kwargs))


@pytest.mark.parametrize("op, arguments", [
    (aten.mm.default, lambda: (meta(6, 4), meta(5, 4))),  # inner sizes differ
    (aten.sub.Tensor, lambda: (meta(3, dtype=torch.bool), meta(3, dtype=torch.bool))),  # torch refuses bool subtraction
    (aten.neg.default, lambda: (meta(3, dtype=torch.bool),)),
    (aten.add.Tensor, lambda: (meta(3, dtype=torch.long), meta(3, dtype=torch.long), 0.5)),  # a float alpha of integers
    (aten.mul.Tensor, lambda: (meta(3), torch.ones(3))),  # a CPU tensor that is not a scalar
    (aten.topk.default, lambda: (meta(3, 4), 5)),  # more than there are
    (aten.gather.default, lambda: (meta(3, 4), 1, meta(3, 2, 1, dtype=torch.long))),
    (aten.index_add_.default, lambda: (meta(6, 8), 0, meta(10, dtype=torch.long), meta(9, 8))),
    (aten.stack.default, lambda: ([meta(3), meta(4)],)),
    (aten._grouped_mm.default, lambda: (meta(10, 8), meta(4, 8, 6), meta(4, dtype=torch.int32))),  # fp32: torch wants bf16
    (aten.add.Tensor, lambda: (meta(3, 4), meta(5))),  # shapes that do not broadcast
    (aten.add_.Tensor, lambda: (meta(3, dtype=torch.long), meta(3))),  # a float result written into integers
    (aten.mean.dim, lambda: (meta(3, 4), [2])),  # no such dimension
    (aten.cat.default, lambda: ([meta(2, 3), meta(2, 4)],)),
])
def test_meta_shapes_refuse_what_torch_refuses(op, arguments):
    from nanollm.shapes import MetaShapes

    with pytest.raises((RuntimeError, IndexError)), MetaShapes():  # the error torch raises
        op(*arguments())


def layouts(value):
    """Shape, strides, dtype and device of a node's output (each output of a node that gives several)."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.stride(), value.dtype, value.device
    return tuple(layouts(v) for v in value) if isinstance(value, (tuple, list)) else None


@pytest.mark.parametrize("name", ["qwen3_0_6b.arch", "gemma3_1b.arch", "qwen3_tiny_hybrid.arch", "qwen3_30b_a3b.arch", "gpt_oss_20b.arch", "deltanet_hybrid.arch",
                                  "hybrid_ssm.arch", "deepseek_v3.arch", "phase3/mhc.arch", "phase3/engram.arch"])
def test_analysis_under_meta_shapes_equals_the_analysis_on_torchs_meta_kernels(name, monkeypatch):
    """Every node's output (shape, strides, dtype) and every figure, for models of every family of component."""
    record = nanollm.analysis._Recorder.run_call

    def analysed():
        monkeypatch.setattr(nanollm.analysis, "_MACS", {})
        compiled, outputs = nanollm.compile(ROOT / "archs" / name), {}
        monkeypatch.setattr(nanollm.analysis._Recorder, "run_call", lambda self, node: outputs.setdefault(node.name, record(self, node)))
        return compiled.analyze(64), {node: layouts(output) for node, output in outputs.items()}

    ours = analysed()
    monkeypatch.setattr(nanollm.analysis, "MetaShapes", contextlib.nullcontext)
    assert ours == analysed()
