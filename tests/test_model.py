"""The compiled GraphModule as a model: materialisation, outputs, causality and training on CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nanollm

HYBRID = (
    "vocab_size = 128\nd_model = 64\nn_heads = 4\nn_kv_heads = 2\nhead_dim = 16\nd_ff = 128\nseq_len = 32\n"
    "repeat 2 < sliding(8); global ffn=moe(top=2, experts=4, d_ff=64) >\n"
)


def test_build_materialises_the_same_graph():
    compiled = nanollm.compile(HYBRID)
    model = compiled.build()
    assert str(model.graph) == str(compiled.graph.graph)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters()) == compiled.analysis.params_total
    assert {p.device.type for p in compiled.graph.parameters()} == {"meta"}  # the analysed graph stays on meta
    again = compiled.build()
    assert not torch.equal(model.embed.weight, again.embed.weight)


def test_forward_returns_logits_and_the_summed_aux_loss():
    model = nanollm.compile(HYBRID).build()
    ids = torch.randint(0, 128, (2, 32))
    logits, aux_loss = model(ids)
    assert logits.shape == (2, 32, 128) and aux_loss.shape == ()
    moe_losses = [model.get_submodule(f"layers.{i}.ffn") for i in (1, 3)]
    # each layer's Switch loss is aux * E * sum f_i P_i >= aux * k (equality at perfect balance)
    assert aux_loss.item() >= len(moe_losses) * 0.01 * 2 - 1e-6
    dense_logits, dense_aux = nanollm.compile("vocab_size = 128\nd_model = 64\nn_heads = 4\nn_kv_heads = 2\nhead_dim = 16\nn_layers = 1").build()(ids)
    assert dense_aux.item() == 0.0 and dense_logits.shape == (2, 32, 128)


def test_tied_head_uses_the_embedding_matrix():
    model = nanollm.compile(HYBRID).build()
    ids = torch.randint(0, 128, (1, 8))
    logits, _ = model(ids)
    hidden = {}
    model.norm.register_forward_hook(lambda module, args, out: hidden.setdefault("h", out))
    model(ids)
    torch.testing.assert_close(logits, F.linear(hidden["h"], model.embed.weight))


def test_whole_model_is_causal():
    torch.manual_seed(0)
    model = nanollm.compile(HYBRID).build()
    ids = torch.randint(0, 128, (1, 32))
    changed = ids.clone()
    changed[0, 20] = (changed[0, 20] + 1) % 128
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_trains_on_cpu():
    torch.manual_seed(0)
    model = nanollm.compile(HYBRID).build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 128, (4, 32))
    losses = []
    for _ in range(30):
        logits, aux_loss = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
        (loss + aux_loss).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_next_token_loss_is_the_mean_log_loss_of_each_next_token_with_the_models_aux_loss():
    torch.manual_seed(0)
    model = nanollm.compile(HYBRID).build()
    rows = torch.randint(0, 128, (2, 33))
    loss, aux_loss = nanollm.NextTokenLoss(model)(rows)
    logits, expected_aux = model(rows[:, :-1])
    log_probs = logits.double().log_softmax(-1)
    picked = [log_probs[b, t, rows[b, t + 1]] for b in range(2) for t in range(32)]  # token t + 1 predicted at position t
    assert torch.allclose(loss.double(), -torch.stack(picked).mean(), rtol=1e-6)
    assert aux_loss.item() == expected_aux.item() > 0  # the MoE layers' balance loss passes through
    loss.backward()
    assert model.embed.weight.grad is not None  # the loss reaches the (tied) embedding


def test_eager_cross_entropy_equals_torchs_in_value_and_gradient_and_refuses_a_second_backward():
    torch.manual_seed(0)
    logits, targets = torch.randn(24, 50, dtype=torch.float64, requires_grad=True), torch.randint(0, 50, (24,))
    reference = F.cross_entropy(logits, targets)
    (expected,) = torch.autograd.grad(reference, logits)
    loss = nanollm.loss.CrossEntropy.apply(logits * 1.0, targets)
    (gradient,) = torch.autograd.grad(loss * 3.0, logits, retain_graph=True)
    assert torch.allclose(loss, reference, rtol=1e-12) and torch.allclose(gradient, 3.0 * expected, rtol=1e-12)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # the gradient was written over its saved tensor
        torch.autograd.grad(loss, logits)
    single = torch.randn(300, 1000) * 3, torch.randint(0, 1000, (300,))  # fp32: the value bit for bit (resumed runs log the same losses)
    assert torch.equal(nanollm.loss.CrossEntropy.apply(*single), F.cross_entropy(*single))
