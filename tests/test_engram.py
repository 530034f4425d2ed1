"""Engram in the `memory` slot: n-gram hashing (deterministic, causal), the gate and convolution against the
paper's equations, gradients only on looked-up rows, the accounting of lookup tables (memory, not compute;
not charged by the budget law), the optimiser role of the tables, the canonical token ids, the language
(an empty slot everywhere else), and positioned errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from nanollm.analysis import analyze
from nanollm.budget import solve
from nanollm.compiler import lower, materialize
from nanollm.components import SLOTS, TABLE
from nanollm.components.memory import engram as engram_module
from nanollm.components.memory.engram import (
    canonical_ids,
    canonical_text,
    is_prime,
    ngram_rows,
)
from nanollm.errors import ArchError
from nanollm.ir import arch_from_json, arch_to_json
from nanollm.optim import split_params
from nanollm.resolve import load
from nanollm.source import arch_source

D, T, VOCAB = 32, 16, 128
TINY = f"vocab_size = {VOCAB}\nd_model = {D}\nn_heads = 2\nn_kv_heads = 1\nhead_dim = 16\nd_ff = 64\nseq_len = {T}\n"
TWO_MEMORIES = "global memory=engram(rows=101)\nglobal\nglobal memory=engram(2, 2, 97, seed=3)\n"


def build(text: str = TWO_MEMORIES, seed: int = 0):
    arch = load(TINY + text)
    meta = lower(arch)
    torch.manual_seed(seed)
    return arch, meta, materialize(meta, "cpu", torch.float32)


def test_memory_is_an_empty_slot_before_the_mixer():
    assert list(SLOTS)[:2] == ["memory", "mixer"] and SLOTS["memory"] is None
    arch = load(TINY + TWO_MEMORIES)
    slots = [[slot for slot, _ in layer.sublayers] for layer in arch.layers]
    assert slots == [["memory", "mixer", "ffn"], ["mixer", "ffn"], ["memory", "mixer", "ffn"]]
    assert load(arch_source(arch)) == arch and arch_from_json(arch_to_json(arch)) == arch
    assert "memory" not in arch_source(load(TINY + "global"))  # a model without memory never mentions the slot
    assert [call.name for call in arch.layers[0].calls()] == ["engram", "global", "swiglu"]


def test_hashing_is_deterministic_and_reads_only_the_last_n_ids():
    *_, model = build()
    memory = model.get_submodule("layers.0.memory")
    ids = torch.randint(0, VOCAB, (2, T))
    rows = memory.rows(ids)
    assert torch.equal(rows, memory.rows(ids.clone())) and rows.shape == (2, T, 2 * 4)
    assert ((rows >= 0) & (rows < memory.table.shape[0])).all()
    for position in (0, 5, T - 1):
        changed = ids.clone()
        changed[:, position] = (changed[:, position] + 1) % VOCAB
        differs = (memory.rows(changed) != rows).any(-1).any(0)
        assert not differs[:position].any() and not differs[position + 3:].any()  # orders 2 and 3: ids t-2..t
        assert differs[position:position + 3].all() if position + 3 <= T else differs[position:].all()
    # order 2's heads depend only on the last two ids: equal bigrams give equal order-2 rows
    pair = torch.tensor([[7, 9, 3, 7, 9]])
    assert torch.equal(memory.rows(pair)[0, 1, :4], memory.rows(pair)[0, 4, :4])
    assert not torch.equal(memory.rows(pair)[0, 1, 4:], memory.rows(pair)[0, 4, 4:])  # trigrams differ


def test_the_whole_model_with_engram_is_causal():
    *_, model = build()
    ids = torch.randint(0, VOCAB, (1, T))
    changed = ids.clone()
    changed[0, 9] = (changed[0, 9] + 5) % VOCAB
    before, after = model(ids)[0], model(changed)[0]
    assert torch.equal(before[0, :9], after[0, :9]) and not torch.allclose(before[0, 9:], after[0, 9:])


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def test_gate_and_convolution_equal_the_papers_equations():
    """alpha = sigmoid(RMSNorm(W_K e) . RMSNorm(h) / sqrt(d)); out = alpha v + SiLU(conv(RMSNorm(alpha v))), the conv a
    sum over taps at dilated past positions, written out token by token."""
    *_, model = build()
    memory = model.get_submodule("layers.0.memory")
    with torch.no_grad():
        for module in (memory.key_norm, memory.query_norm, memory.conv_norm):
            module.weight.uniform_(0.5, 1.5)
        memory.conv.weight.normal_(std=0.5)
        memory.key_proj.bias.normal_()
        memory.value_proj.bias.normal_()
    ids, h = torch.randint(0, VOCAB, (2, T)), torch.randn(2, T, D)
    eps = 1e-6
    rows = memory.rows(ids)
    e = torch.stack([torch.cat([memory.table[rows[b, t, j]] for j in range(rows.shape[-1])])
                     for b in range(2) for t in range(T)]).view(2, T, -1)
    k = rms(e @ memory.key_proj.weight.T + memory.key_proj.bias, memory.key_norm.weight, eps)
    q = rms(h, memory.query_norm.weight, eps)
    alpha = torch.sigmoid((k * q).sum(-1, keepdim=True) / math.sqrt(D))
    gated = alpha * (e @ memory.value_proj.weight.T + memory.value_proj.bias)
    z = rms(gated, memory.conv_norm.weight, eps)
    taps, dilation = memory.conv.weight.shape[-1], memory.conv.dilation[0]
    assert dilation == 3  # the largest order, as the paper's code
    conv = torch.zeros_like(z)
    for t in range(T):
        for j in range(taps):
            source = t - (taps - 1 - j) * dilation
            if source >= 0:
                conv[:, t] += memory.conv.weight[:, 0, j] * z[:, source]
    expected = gated + F.silu(conv)
    assert torch.allclose(memory(h, ids), expected, atol=1e-5)


def test_tables_get_gradients_only_on_the_rows_looked_up():
    *_, model = build()
    ids = torch.randint(0, VOCAB, (2, T))
    logits, _ = model(ids)
    F.cross_entropy(logits.flatten(0, 1), torch.randint(0, VOCAB, (2 * T,))).backward()  # every position in the loss
    for name in ("layers.0.memory", "layers.2.memory"):
        memory = model.get_submodule(name)
        touched = torch.zeros(memory.table.shape[0], dtype=torch.bool)
        touched[memory.rows(ids).flatten()] = True
        with_gradient = memory.table.grad.abs().sum(-1) > 0
        assert torch.equal(with_gradient, touched), name
        assert memory.key_proj.weight.grad.abs().sum() > 0 and memory.conv.weight.grad.abs().sum() > 0


def test_tables_are_counted_as_memory_not_as_active_parameters_or_flops():
    arch, meta, _ = build()
    plain = load(TINY + "global\nglobal\nglobal\n")
    with_memory, without = analyze(arch, meta, T), analyze(plain, lower(plain), T)
    tables = [(sum([101, 103, 107, 109, 113, 127, 131, 137]), D // 4), (97 + 101, D // 2)]  # distinct primes upward
    assert with_memory.params_memory == sum(rows * width for rows, width in tables)
    gate_and_projections = [2 * (2 * D) * D + 2 * D + 3 * D, 2 * D * D + 2 * D + 3 * D]  # W_K, W_V (+ biases), 3 norms
    conv = [4 * D, 4 * D]
    site_norms = [D, D]  # the pre-norm residual's norm before each memory
    touched = [2 * 4 * (D // 4), 1 * 2 * (D // 2)]  # (N - 1) heads rows of dim / heads
    extra = sum(gate_and_projections) + sum(conv) + sum(site_norms)
    assert with_memory.params_total - without.params_total == extra + with_memory.params_memory
    assert with_memory.params_active - without.params_active == extra + sum(touched)
    # FLOPs: the projections, the gate's dot product and the convolution; lookups and hashing cost none
    macs = [2 * (2 * D) * D + D + 4 * D, 2 * D * D + D + 4 * D]
    assert with_memory.flops_per_token_fwd - without.flops_per_token_fwd == 2 * sum(macs)


def test_the_budget_law_does_not_charge_for_tables():
    """Two files that differ only in table size get the same model and the same tokens for one budget."""
    small = solve(TINY + "global memory=engram(rows=101)\nrepeat auto < global >\n", 1e12)
    large = solve(TINY + "global memory=engram(rows=100003)\nrepeat auto < global >\n", 1e12)
    assert large.analysis.params_memory > 100 * small.analysis.params_memory
    assert (len(large.arch.layers), large.tokens) == (len(small.arch.layers), small.tokens)


def test_tables_are_adamw_tables_whatever_their_shape():
    *_, model = build("global memory=engram(rows=101, heads=1, dim=32)\n")  # a (rows, 32) table looks like a matrix
    split = split_params(model)
    assert "layers.0.memory.table" in split.tables and "layers.0.memory.table" not in split.hidden_matrices
    assert "layers.0.memory.key_proj.weight" in split.hidden_matrices and "layers.0.memory.conv.weight" in split.vectors
    assert model.get_submodule("layers.0.memory").param_roles() == {"table": TABLE}


class WordTokenizer:
    """A stand-in for a transformers tokenizer: id -> text."""

    def __init__(self, words: list[str]) -> None:
        self.words = words

    def __len__(self) -> int:
        return len(self.words)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.words[i] for i in ids)

    def get_vocab(self) -> dict[str, int]:
        return {word: i for i, word in enumerate(self.words)}


def test_canonical_ids_merge_case_accents_unicode_forms_and_whitespace_and_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOLLM_CACHE", str(tmp_path))
    words = ["Hello", "hello", "héllo", " x", "\u00a0x", "\t\n x", "ﬁ", "fi", "\ufffd", "\ufffd\ufffd", "World"]
    assert canonical_text("Ça  va\u00a0\t") == "ca va "
    table = canonical_ids(WordTokenizer(words)).tolist()
    assert table == [0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 5]  # partial UTF-8 tokens (U+FFFD) keep ids of their own
    cached = list(tmp_path.glob("engram/canonical-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text()) == table
    monkeypatch.setattr(engram_module, "canonical_table", lambda tokenizer: pytest.fail("rebuilt instead of read"))
    assert canonical_ids(WordTokenizer(words)).tolist() == table
    *_, model = build("global memory=engram(rows=101)\n")
    memory = model.get_submodule("layers.0.memory")
    memory.use_tokenizer(WordTokenizer(words))
    assert memory.canonical[:11].tolist() == table and memory.canonical[11:].tolist() == list(range(6, 6 + VOCAB - 11))
    assert torch.equal(memory.rows(torch.tensor([[0, 3]])), memory.rows(torch.tensor([[1, 5]])))  # "Hello x" = "hello x"


def test_hashing_runs_on_meta_and_under_compile():
    ids = torch.randint(0, VOCAB, (2, T))
    factors, moduli = torch.tensor([3, 5, 7]), torch.tensor([11, 13, 17, 19])
    offsets = torch.tensor([0, 11, 24, 41])
    eager = ngram_rows(ids, factors, moduli, offsets, 2, VOCAB)
    compiled = torch.compile(ngram_rows, backend="aot_eager", fullgraph=True)(ids, factors, moduli, offsets, 2, VOCAB)
    assert torch.equal(eager, compiled)
    meta = ngram_rows(ids.to("meta"), factors.to("meta"), moduli.to("meta"), offsets.to("meta"), 2, VOCAB)
    assert meta.shape == eager.shape and meta.device.type == "meta"


@pytest.mark.parametrize("call, message", [
    ("engram(orders=1)", "must be at least 2"),
    ("engram(rows=100)", "rows=100 is not prime .* nearest are 97 and 101"),
    ("engram(heads=3)", "dim=32 does not split into heads=3"),
])
def test_bad_engram_arguments_are_positioned_errors(call, message):
    with pytest.raises(ArchError, match=message) as error:
        load(TINY + f"global\nglobal memory={call}\n")
    assert error.value.pos is not None and error.value.pos.line == 9
    assert load(TINY + "global memory=engram(rows=100, primes=false)\n").layers[0].get("memory").kwargs()["rows"] == 100


def test_engram_is_not_a_mixer():
    with pytest.raises(ArchError, match="'engram' is a memory, not a mixer") as error:
        load(TINY + "engram\n")
    assert error.value.pos.line == 8
    assert is_prime(10007) and not is_prime(10001)


def test_a_model_with_engram_at_two_layers_trains_on_the_embedded_default(tmp_path):
    from safetensors.torch import load_file

    from nanollm.cli import main
    from nanollm.train.checkpoint import latest_checkpoint

    arch = tmp_path / "engram.arch"
    arch.write_text("vocab_size = 8192\nd_model = 64\nn_heads = 4\nn_kv_heads = 2\nhead_dim = 16\nd_ff = 128\nseq_len = 64\n"
                    "let memory = engram(rows=1009)\nglobal memory=memory\nglobal\nglobal memory=memory\n")
    run = tmp_path / "run"
    assert main(["train", str(arch), "--out", str(run), "--steps", "16", "--log-every", "1", "--batch-size", "4", "--shuffle-buffer", "8",
                 "--eval-tokens", "512", "--eval-every", "0"]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    state = load_file(latest_checkpoint(run) / "model.safetensors")  # the run keyed its n-grams by the tokenizer's canonical ids
    canonical = state["layers.0.memory.canonical"]
    assert canonical.unique().numel() < 8192 and not torch.equal(canonical, torch.arange(8192))
