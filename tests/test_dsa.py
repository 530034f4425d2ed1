"""DeepSeek sparse attention (`dsa`): keeping every key is MLA, the indexer's choice by its equation, and the accounting
(the indexer's T x T scoring and the T x topk attention, counted apart) against closed forms and FlopCounterMode.
Whole DeepSeek-V3.2 models against transformers are in test_deepseek.py."""
from __future__ import annotations

import pytest
import torch
from test_components import CONFIG, build, close, mix
from torch.utils.flop_counter import FlopCounterMode

import nanollm
from nanollm.compiler import make_table
from nanollm.components import complete
from nanollm.components.attention import dsa
from nanollm.components.attention.dsa import INDEX_BLOCK
from nanollm.ir import Call

SIZES = {"kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12}
INDEXER = {"index_heads": 4, "index_head_dim": 16}
TINY = "vocab_size = 256\nd_model = 64\nn_heads = 4\nn_kv_heads = 4\nhead_dim = 16\nd_ff = 128\n"


def rope(interleaved: bool) -> Call:
    """A RoPE call (base 1e3), interleaved pairs or half-split."""
    return complete(Call("rope", (("theta", 1e3), ("interleaved", interleaved))), "position", CONFIG)


@pytest.mark.parametrize("interleaved, shared", [(True, False), (False, False), (True, True)], ids=["interleaved", "half-split", "shared-latent"])
def test_dsa_keeping_every_key_is_mla(interleaved, shared):
    sizes = SIZES | ({"q_lora_rank": 0, "shared_latent": True} if shared else {})  # shared: the indexer reads the kv latent
    sparse = build("dsa", CONFIG, topk=32, rope=rope(interleaved), **sizes, **INDEXER)
    dense = build("mla", CONFIG, rope=rope(interleaved), **sizes)
    dense.load_state_dict({k: v for k, v in sparse.state_dict().items() if not k.startswith("indexer.")})
    x = torch.randn(2, 13, 64)
    close(mix(sparse, x), mix(dense, x), atol=2e-5)
    sparse.topk = 3
    assert (mix(sparse, x) - mix(dense, x)).abs().max() > 1e-2


def test_dsa_attends_exactly_the_keys_its_indexer_scores_highest():
    """The output equals MLA under a mask keeping, for each query, the top-k earlier keys of sum_h w_h relu(q_h . k)."""
    torch.manual_seed(0)
    sparse = build("dsa", CONFIG, topk=4, rope=rope(True), **SIZES, **INDEXER)
    x = torch.randn(1, 12, 64)
    cos, sin = make_table(sparse.rotary)(torch.arange(12))
    _, _, q_latent = sparse.queries(x, cos, sin)
    index = sparse.indexer(x, q_latent, cos, sin, sparse.layout)[0]
    # by the equation, with the tables rebuilt half-split from the positions
    inv_freq = 1.0 / 1e3 ** (torch.arange(0, 8, 2).float() / 8)
    angles = torch.arange(12)[:, None].float() * inv_freq

    def rot(t: torch.Tensor) -> torch.Tensor:  # half-split RoPE on the first 8 channels
        first, second, rest = t[..., :4], t[..., 4:8], t[..., 8:]
        c, s = angles.cos(), angles.sin()
        return torch.cat((first * c - second * s, second * c + first * s, rest), dim=-1)

    indexer = sparse.indexer
    q = rot(indexer.wq_b(q_latent[0]).view(12, 4, 16).transpose(0, 1)).transpose(0, 1)  # (T, heads, d)
    k = rot(indexer.k_norm(indexer.wk(x[0])))  # (T, d)
    w = indexer.weights_proj(x[0]) / 2
    expected = torch.einsum("thd,sd->ths", q, k).div(4).relu().mul(w[..., None]).sum(1)
    expected = expected.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    close(index, expected)
    dense = build("mla", CONFIG, rope=rope(True), **SIZES)
    dense.load_state_dict({k: v for k, v in sparse.state_dict().items() if not k.startswith("indexer.")})
    keep = torch.zeros(12, 12, dtype=torch.bool).scatter(1, expected.topk(4).indices, True) & torch.ones(12, 12, dtype=torch.bool).tril()
    mask = torch.zeros(12, 12).masked_fill(~keep, float("-inf"))
    # MLA's training form under that mask, written out
    q_nope, q_rope, _ = dense.queries(x, cos, sin)
    latent, k_rope = dense.latents(x, cos, sin)
    kv = dense.kv_b_proj(latent.squeeze(1)).view(1, 12, 4, 20).transpose(1, 2)
    keys = torch.cat((kv[..., :8], k_rope.expand(-1, 4, -1, -1)), dim=-1)
    weights = (torch.cat((q_nope, q_rope), dim=-1) @ keys.transpose(-1, -2) * dense.scale + mask).softmax(-1)
    close(mix(sparse, x), dense.output(x, weights @ kv[..., 8:]), atol=2e-5)


def dsa_macs(seq_len: int, d: int, heads: int, kv: int, q: int, nope: int, rope: int, v: int, topk: int, index_heads: int,
             index_dim: int, learns: bool = True) -> tuple[int, int, int, int]:
    """Closed-form multiply-accumulates of one dsa layer: (projections, indexer scoring, attention over the chosen keys, the
    indexer's loss: its scores on the chosen keys, while it learns)."""
    kept = min(topk, seq_len)
    projections = seq_len * (d * q + q * heads * (nope + rope) + d * (kv + rope) + heads * v * d  # as MLA's
                             + heads * (nope * kv + kv * v)  # the absorbed up-projections
                             + (q * index_heads * index_dim + d * index_dim + d * index_heads) * (topk < seq_len or learns))  # the indexer's, if it chooses or learns
    # q.k per head, then the weighted sum over heads: blocks of queries past the first topk, each against its prefix
    scoring = sum((min(start + INDEX_BLOCK, seq_len) - start) * min(start + INDEX_BLOCK, seq_len) for start in range(kept, seq_len, INDEX_BLOCK))
    scoring *= index_heads * (index_dim + 1)
    attention = heads * seq_len * kept * (2 * kv + rope)
    return projections, scoring, attention, seq_len * kept * index_heads * (index_dim + 1) * learns


@pytest.mark.parametrize("seq_len, topk", [(64, 16), (32, 48), (INDEX_BLOCK + 40, 8)])
def test_dsa_flops_and_cache_match_closed_forms(seq_len, topk):
    call = (f"dsa(topk={topk}, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, "
            "index_heads=4, index_head_dim=16)")
    compiled = nanollm.compile(TINY + f"{call} ffn=none")
    analysis = compiled.analyze(seq_len)
    layer = sum(dsa_macs(seq_len, 64, 4, 32, 48, 16, 8, 24, topk, 4, 16))
    assert analysis.layers[0].flops_per_token_fwd * seq_len == 2 * layer
    assert analysis.flops_per_token_fwd * seq_len == 2 * (layer + seq_len * 64 * 256)
    assert analysis.cache_bytes_per_token == (32 + 8 + 16) * 2  # latent, RoPE key and the indexer's key, bf16
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:  # every product is a matmul: the counts agree exactly
        compiled.graph(ids)
    assert counter.get_total_flops() == analysis.flops_per_token_fwd * seq_len


@pytest.mark.parametrize("text, message", [
    ("dsa(topk=0, q_lora_rank=32, kv_lora_rank=32)", "topk"),
    ("dsa(topk=8, kv_lora_rank=32)", "the indexer reads the query latent"),
    ("dsa(topk=8, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=32, index_head_dim=16)", "do not fit an indexer head"),
])
def test_dsa_bad_arguments_are_positioned_errors(text, message):
    with pytest.raises(nanollm.ArchError, match=message) as error:
        nanollm.compile(TINY + text)
    assert ":7:" in str(error.value)


def test_language_loss_trains_all_but_the_indexer_and_its_kl_loss_the_indexer_alone():
    """The choice is not differentiable: the language loss reaches every weight but the indexer's; the indexer's loss (inputs
    detached) reaches the indexer's alone."""
    model = nanollm.compile(TINY + "dsa(topk=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, index_heads=2, index_head_dim=16)").build()
    logits, aux_loss = model(torch.randint(0, 256, (2, 12)))
    logits.logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        assert (param.grad is None) == (".indexer." in name), name
    model.zero_grad(set_to_none=True)
    aux_loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None and param.grad.abs().sum() > 0) == (".indexer." in name), name


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_indexer_loss_is_the_kl_of_its_equation_with_its_gradient(monkeypatch, weight):
    """aux_loss = weight * mean over queries of KL(p_t || softmax over S_t of I_t), p_t the heads' mean attention weights on the
    chosen keys S_t (summed over heads, L1-normed), I the indexer's scores; its gradient on every indexer weight likewise."""
    monkeypatch.setattr(dsa, "ATTEND_BLOCK_KEYS", 12)  # several checkpointed blocks of queries
    torch.manual_seed(1)
    sparse = build("dsa", CONFIG, topk=4, index_loss=weight, rope=rope(True), **SIZES, **INDEXER).train()
    x = torch.randn(1, 12, 64)
    _, loss = sparse(x, *make_table(sparse.rotary)(torch.arange(12)))
    indexer = list(sparse.indexer.parameters())
    grads = torch.autograd.grad(loss, indexer)
    # by the equations: the main attention written out (MLA's training form) under the chosen-key mask
    cos, sin = make_table(sparse.rotary)(torch.arange(12))
    latent, k_rope = sparse.latents(x, cos, sin)
    q_nope, q_rope, q_latent = sparse.queries(x, cos, sin, latent)
    q_index, k_index, w_index = sparse.indexer.project(x, q_latent.detach(), cos, sin, sparse.layout)
    index = torch.einsum("thd,sd->ths", q_index[0], k_index[0]).relu().mul(w_index[0][..., None]).sum(1)  # (T, T) with grad
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    keep = torch.zeros(12, 12, dtype=torch.bool).scatter(1, index.detach().masked_fill(~causal, float("-inf")).topk(4).indices, True) & causal
    kv = sparse.kv_b_proj(latent.squeeze(1)).view(1, 12, 4, 20).transpose(1, 2)
    keys = torch.cat((kv[..., :8], k_rope.expand(-1, 4, -1, -1)), dim=-1)
    scores = (torch.cat((q_nope, q_rope), dim=-1) @ keys.transpose(-1, -2) * sparse.scale).masked_fill(~keep, float("-inf"))
    target = scores.softmax(-1).sum(1)[0].detach()
    target = target / target.sum(-1, keepdim=True)
    log_index = index.masked_fill(~keep, float("-inf")).log_softmax(-1)
    expected = weight * torch.where(keep, target * (target.log() - log_index), 0.0).sum(-1).mean()
    close(loss, expected, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(expected, indexer)):
        close(got, want, atol=1e-6)
    sparse.eval()
    assert sparse(x, cos, sin)[1] == 0  # evaluation computes no indexer loss


def test_blockwise_chosen_attention_equals_the_gathered_form_with_its_gradients(monkeypatch):
    """ChosenAttention (blocks of queries, recomputed in backward) against every chosen key gathered at once."""
    monkeypatch.setattr(dsa, "ATTEND_BLOCK_KEYS", 20)  # blocks of 4 queries at 5 keys each: several blocks, one ragged
    torch.manual_seed(0)
    batch, length, heads, width, values, kept = 2, 11, 3, 10, 6, 5
    q = torch.randn(batch, length, heads, width, requires_grad=True)
    keys = torch.randn(batch, length, width, requires_grad=True)
    chosen = torch.stack([torch.randperm(length)[:kept] for _ in range(batch * length)]).view(batch, length, kept)
    visible = chosen <= torch.arange(length)[:, None]
    visible[..., 0] = True
    chosen[..., 0] = torch.arange(length)  # every query sees at least itself
    probe = torch.randn(batch, length, heads, values)
    expected, expected_target = dsa.attend_gathered(q, keys, chosen, visible, 0.7, values)
    expected_grads = torch.autograd.grad((expected * probe).sum(), (q, keys))
    rows = (chosen + torch.arange(batch).view(-1, 1, 1) * length).flatten(0, 1)
    actual, target = dsa.ChosenAttention.apply(q.flatten(0, 1), keys.flatten(0, 1), rows, visible.flatten(0, 1), 0.7, values)
    actual = actual.view_as(expected)
    close(actual, expected)
    close(target.view_as(expected_target), expected_target)
    for got, want in zip(torch.autograd.grad((actual * probe).sum(), (q, keys)), expected_grads):
        close(got, want)
