"""nanollm's Muon against torch.optim.Muon, the parameter split, and the learning-rate schedules."""
from __future__ import annotations

import math

import pytest
import torch

import nanollm
from nanollm.optim import build_optimizers, lr_multiplier, split_params
from nanollm.optim.muon import Muon, default_ns_dtype, orthogonalize
from nanollm.train.recipe import Recipe

HYBRID = (
    "vocab_size = 128\nd_model = 64\nn_heads = 4\nn_kv_heads = 2\nhead_dim = 16\nd_ff = 128\nseq_len = 32\n"
    "tie_embeddings = false\nrepeat 2 < sliding(8); global ffn=moe(top=2, experts=4, d_ff=64) >\n"
)


def run(optimizer_cls, shape, steps=3, **kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(*shape))
    optimizer = optimizer_cls([param], lr=0.02, **kwargs)
    for _ in range(steps):
        param.grad = torch.randn(*shape)
        optimizer.step()
    return param.detach()


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_muon_at_bf16_is_torch_muon(shape, adjust, nesterov, weight_decay):
    ours = run(Muon, shape, adjust_lr_fn=adjust, nesterov=nesterov, weight_decay=weight_decay, ns_dtype=torch.bfloat16)
    theirs = run(torch.optim.Muon, shape, adjust_lr_fn=adjust, nesterov=nesterov, weight_decay=weight_decay)
    assert torch.equal(ours, theirs)


def test_muon_runs_fp32_on_cpu():
    assert default_ns_dtype(torch.device("cpu")) == torch.float32
    assert default_ns_dtype(torch.device("cuda")) == torch.bfloat16
    assert torch.equal(run(Muon, (32, 48)), run(Muon, (32, 48), ns_dtype=torch.float32))
    # fp32 and bf16 iterations agree to bf16's precision, so the choice is about speed, not the update
    torch.testing.assert_close(run(Muon, (32, 48)), run(Muon, (32, 48), ns_dtype=torch.bfloat16), atol=2e-2, rtol=0)


def test_orthogonalize_flattens_the_spectrum():
    torch.manual_seed(0)
    update = torch.randn(64, 32) @ torch.diag(torch.logspace(-1, 1, 32))  # singular values spread 100-fold
    singular = torch.linalg.svdvals(orthogonalize(update, steps=5, eps=1e-7, dtype=torch.float32))
    assert singular.min() > 0.5 and singular.max() < 1.6  # Newton-Schulz's band around 1


def test_stacked_matrices_are_orthogonalised_one_by_one():
    torch.manual_seed(0)
    stack = torch.randn(3, 16, 24)  # (experts, out, in)
    whole = orthogonalize(stack, 5, 1e-7, torch.float32)
    for i in range(3):
        torch.testing.assert_close(whole[i], orthogonalize(stack[i], 5, 1e-7, torch.float32), atol=1e-5, rtol=0)


def test_stacks_scale_like_their_matrices():
    """An expert stack's update is the stacked updates of its matrices, with each matrix's own lr scale."""
    torch.manual_seed(0)
    stack, grads = torch.randn(3, 48, 16), torch.randn(2, 3, 48, 16)  # tall (out > in): "original" scales by sqrt(3)
    whole = torch.nn.Parameter(stack.clone())
    parts = [torch.nn.Parameter(stack[i].clone()) for i in range(3)]
    optimizers = [Muon([whole], lr=0.02), Muon(parts, lr=0.02)]
    for grad in grads:
        whole.grad = grad.clone()
        for i, part in enumerate(parts):
            part.grad = grad[i].clone()
        for optimizer in optimizers:
            optimizer.step()
    torch.testing.assert_close(whole.detach(), torch.stack([p.detach() for p in parts]), atol=1e-6, rtol=0)


def test_muon_takes_exactly_the_hidden_matrices():
    model = nanollm.compile(HYBRID).build()
    muon, adamw = build_optimizers(model, Recipe(optimizer="muon").optimizer_settings())
    by_id = {id(p): name for name, p in model.named_parameters()}
    on_muon = {by_id[id(p)] for group in muon.param_groups for p in group["params"]}
    on_adamw = {by_id[id(p)] for group in adamw.param_groups for p in group["params"]}
    expected = {name for name, p in model.named_parameters() if p.dim() >= 2 and name not in ("embed.weight", "lm_head.weight")}
    assert on_muon == expected
    assert any(".mixer.q_proj." in name for name in on_muon) and any(name.endswith("ffn.gate_up") for name in on_muon)
    assert on_adamw == set(by_id.values()) - expected  # everything else, once
    assert {"embed.weight", "lm_head.weight", "norm.weight"} <= on_adamw
    decayed = {by_id[id(p)] for group in adamw.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert decayed == {"embed.weight", "lm_head.weight"}  # norms are not decayed


def test_adamw_recipe_decays_matrices_only():
    model = nanollm.compile(HYBRID).build()
    (adamw,) = build_optimizers(model, Recipe().optimizer_settings())
    split = split_params(model)
    decayed = {id(p) for group in adamw.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert decayed == {id(p) for p in [*split.hidden_matrices.values(), *split.tables.values()]}
    assert adamw.defaults["fused"]


def test_cosine_schedule():
    f = lr_multiplier("cosine", total=100, warmup_fraction=0.1, decay_fraction=0.2, final=0.1)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0)
    assert f(99) == pytest.approx(0.1)
    midpoint = 10 + (99 - 10) / 2
    assert f(int(midpoint)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * int(midpoint - 10) / 89)))
    assert all(f(s) >= f(s + 1) for s in range(10, 99))


def test_warmup_stable_decay_schedule():
    f = lr_multiplier("wsd", total=100, warmup_fraction=0.05, decay_fraction=0.2, final=0.0)
    assert f(0) == pytest.approx(0.2) and f(4) == pytest.approx(1.0)
    assert all(f(s) == 1.0 for s in range(5, 80))
    assert [f(s) for s in range(80, 100)] == pytest.approx([1 - (s - 79) / 20 for s in range(80, 100)])
    assert f(99) == 0.0
