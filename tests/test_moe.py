"""The mixture of experts, fp32 on CPU: routing, dispatch, capacity, balancing, statistics, accounting.

References written outside this repo: transformers' Qwen3MoeSparseMoeBlock and DeepseekV3MoE (weights
copied) and Mixtral's load_balancing_loss_func. References written here from the definitions: a
one-token-at-a-time expert loop, capacity dropping by plain sorting, and the balance losses and load
metrics computed with Python floats on hand-made routings.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from test_components import ATOL, CONFIG, build, close
from transformers import DeepseekV3Config, DeepseekV4Config, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import nanollm
from nanollm import ArchError
from nanollm.components import REGISTRY, recomputing
from nanollm.components.ffn import dispatch
from nanollm.compiler import make_component
from nanollm.decode import Decoder
from nanollm.hf import call, moe_call

ROUTINGS = [(1, 4), (2, 4), (4, 4), (3, 8)]  # (top, experts): top=1 and top=experts are the edges
D_FF = 32
DEEPSEEK = dict(top=4, experts=16, shared=2, router="sigmoid", groups=4, top_groups=2, balance="bias", scale=2.5)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def moe(**args):
    """A registered moe with experts of width D_FF, unit-scale weights, in eval mode."""
    return build("moe", **{"d_ff": D_FF, **args})


def reference(module, x: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """For every token, the weighted sum of its kept experts' SwiGLUs plus the shared experts, one token at a time."""
    flat = x.reshape(-1, x.shape[-1])
    routing = module.router(x.reshape(-1, x.shape[-2], x.shape[-1]), getattr(module, "selection_bias", None))
    d_ff = module.down.shape[-1]
    rows = []
    for token in range(flat.shape[0]):
        total = torch.zeros_like(flat[token])
        for slot in range(module.top):
            if kept is not None and not kept[token, slot]:
                continue
            e = routing.experts[token, slot]
            hidden = module.gate_up[e] @ flat[token]
            total = total + routing.weights[token, slot] * (module.down[e] @ (F.silu(hidden[:d_ff]) * hidden[d_ff:]))
        if module.shared_experts is not None:
            total = total + module.shared_experts(flat[token])
        rows.append(total)
    return torch.stack(rows).view(x.shape)


def identity_router(module, experts: int) -> None:
    """Router logits = the first `experts` input features, so a test writes its routing into x."""
    with torch.no_grad():
        module.router.weight.zero_()
        module.router.weight[:, :experts] = torch.eye(experts)


def inputs_with_logits(logits: list[list[list[float]]]) -> torch.Tensor:
    """x of shape (B, T, d) whose first features are the given router logits (the rest random)."""
    given = torch.tensor(logits)
    x = torch.randn(*given.shape[:2], CONFIG.d_model)
    x[..., : given.shape[-1]] = given
    return x


# --- dispatch ------------------------------------------------------------------------------------


@pytest.mark.parametrize("top,experts", ROUTINGS)
@pytest.mark.parametrize("norm_topk", [True, False])
@pytest.mark.parametrize("shape", [(2, 8), (1, 1)])
def test_dropless_matches_token_loop(top, experts, norm_topk, shape):
    module = moe(top=top, experts=experts, norm_topk=norm_topk)
    x = torch.randn(*shape, CONFIG.d_model)
    close(module(x)[0], reference(module, x))


@pytest.mark.parametrize("balance", ["bias", "aux"])
def test_sigmoid_grouped_shared_matches_token_loop(balance):
    module = moe(**{**DEEPSEEK, "balance": balance})
    if balance == "bias":
        torch.nn.init.normal_(module.selection_bias, std=0.5)
    x = torch.randn(2, 8, CONFIG.d_model)
    close(module(x)[0], reference(module, x))


@pytest.mark.parametrize("grouped", [False, True])
def test_idle_experts_make_empty_groups(monkeypatch, grouped):
    monkeypatch.setattr(dispatch, "use_grouped_mm", lambda rows: grouped)
    module = moe(top=2, experts=4)
    x = torch.randn(2, 8, CONFIG.d_model)
    x[..., 0] = 1.0
    with torch.no_grad():
        module.router.weight[[0, 3], 0] = -100.0  # experts 0 and 3 lose every routing decision
    routing = module.router(x)
    assert set(routing.experts.unique().tolist()) == {1, 2}
    close(module(x)[0], reference(module, x))


def assert_same_gradient(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to 1e-5 of the gradient's scale: fp32 sums over 16 tokens of terms up to ~50, in another order."""
    torch.testing.assert_close(actual, expected, atol=ATOL * expected.abs().max().item(), rtol=0)


def grads(module, output: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [name for name, _ in module.named_parameters()]
    return dict(zip(names, torch.autograd.grad(output, list(module.parameters()), materialize_grads=True)))


@pytest.mark.parametrize("capacity", [0.0, 1.0])
def test_gradients_reach_every_weight(capacity):
    module = moe(top=2, experts=4, shared=1, capacity=capacity)
    x = torch.randn(2, 8, CONFIG.d_model)
    probe = torch.randn_like(x)
    kept = capacity_kept(module, x, "score") if capacity else None
    dispatched = grads(module, (module(x)[0] * probe).sum())
    expected = grads(module, (reference(module, x, kept) * probe).sum())
    for name in expected:
        assert dispatched[name].abs().sum() > 0, name
        assert_same_gradient(dispatched[name], expected[name])
    assert grads(module, module(x)[1])["router.weight"].abs().sum() > 0  # the balance loss trains the router too


@pytest.mark.parametrize("top,experts", ROUTINGS)
def test_grouped_mm_matches_expert_loop(monkeypatch, top, experts):
    """The two dropless paths: grouped matmuls (GPUs, analysis) and the loop over experts (CPUs), values and gradients."""
    module = moe(top=top, experts=experts)
    x = torch.randn(2, 8, CONFIG.d_model, requires_grad=True)
    module.zero_grad()
    outputs = {}
    for grouped in (False, True):
        monkeypatch.setattr(dispatch, "use_grouped_mm", lambda rows: grouped)
        y = module(x)[0]
        outputs[grouped] = (y, grads(module, y.square().sum()), torch.autograd.grad(module(x)[0].square().sum(), x)[0])
    (loop, loop_grads, loop_dx), (grouped, grouped_grads, grouped_dx) = outputs[False], outputs[True]
    close(loop, grouped)
    for name, grad in loop_grads.items():
        assert_same_gradient(grad, grouped_grads[name])
    assert_same_gradient(loop_dx, grouped_dx)


@pytest.mark.parametrize("path", ["loop", "grouped", "capacity"])
def test_runs_under_bf16_autocast(monkeypatch, path):
    """bf16 autocast (the default on GPUs without FSDP) runs the experts' matmuls in bf16 on fp32 tokens: every
    dispatch path returns fp32 close to the fp32 result, and its gradients reach every weight."""
    monkeypatch.setattr(dispatch, "use_grouped_mm", lambda rows: path == "grouped")
    module = moe(top=2, experts=4, shared=1, capacity=1.0 if path == "capacity" else 0.0)
    x = torch.randn(2, 8, CONFIG.d_model)
    expected = module(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = module(x)
        gradients = grads(module, y.float().square().sum() + aux)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
    assert all(grad.abs().sum() > 0 for grad in gradients.values())


def test_compiled_bf16_autocast_takes_the_grouped_path(monkeypatch):
    """torch.compile under bf16 autocast (the GPU default without FSDP) traces the grouped matmuls on operands
    cast to bf16, rather than breaking the graph for the eager expert loop; values and gradients stay close
    to fp32's."""
    module = moe(top=2, experts=4)
    x = torch.randn(2, 8, CONFIG.d_model)
    expected = module(x)[0]
    expected_grads = grads(module, expected.square().sum())

    def no_loop(*args):
        raise AssertionError("the expert loop ran")

    monkeypatch.setattr(dispatch, "expert_loop", no_loop)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.compile(module, fullgraph=True)(x)[0]
        gradients = grads(module, y.float().square().sum())
    scale = expected.abs().max().item()
    torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.05 * scale)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(gradients[name], grad, rtol=0.1, atol=0.05 * grad.abs().max().item())


def test_dispatch_is_chosen_by_device():
    assert not dispatch.use_grouped_mm(torch.zeros(2, 8))  # eager on a CPU: the expert loop is faster
    assert dispatch.use_grouped_mm(torch.zeros(2, 8, device="meta", dtype=torch.bfloat16))  # the analysis


def test_runs_on_meta_in_bf16():
    with torch.device("meta"):
        module = build("moe", shared=1).to(torch.bfloat16)
        x = torch.randn(2, 8, CONFIG.d_model, dtype=torch.bfloat16)
    y, aux = module(x)
    assert (y.device.type, y.dtype, y.shape) == ("meta", torch.bfloat16, x.shape)
    assert (aux.device.type, aux.shape) == ("meta", ())


@pytest.mark.parametrize("d_model,d_ff", [(64, 6), (64, 12), (60, 32)])
def test_refuses_or_runs_any_width(d_model, d_ff):
    """Widths the language accepts must be refused by MoE.check or run: fp32 on CPU and bf16 on meta (analysis)."""
    config = dataclasses.replace(CONFIG, d_model=d_model)
    args = {p.name: p.default_for(config) for p in REGISTRY["moe"].params} | dict(top=2, experts=4, d_ff=d_ff)
    if REGISTRY["moe"].module.check(config, **args) is not None:
        return
    module = build("moe", config, **args)
    x = torch.randn(2, 8, d_model)
    close(module(x)[0], reference(module, x))
    with torch.device("meta"):
        meta = build("moe", config, **args).to(torch.bfloat16)
        assert meta(x.to("meta", torch.bfloat16))[0].shape == x.shape


# --- capacity ------------------------------------------------------------------------------------


def capacity_kept(module, x: torch.Tensor, drop: str) -> torch.Tensor:
    """(N, k) mask of the assignments an expert of capacity ceil(cf * k * N / E) keeps, by plain sorting."""
    routing = module.router(x.reshape(-1, x.shape[-2], x.shape[-1]))
    tokens, top = routing.experts.shape
    slots = math.ceil(module.capacity * top * tokens / module.experts)
    kept = torch.zeros(tokens, top, dtype=torch.bool)
    for e in range(module.experts):
        mine = [(t, j) for t in range(tokens) for j in range(top) if routing.experts[t, j] == e]
        if drop == "score":
            mine.sort(key=lambda tj: -routing.weights[tj].item())
        else:
            mine.sort(key=lambda tj: (tj[1], tj[0]))  # first choices first, then earlier tokens
        for t, j in mine[:slots]:
            kept[t, j] = True
    return kept


def overloaded(drop: str, capacity: float = 1.0):
    """16 tokens whose first choice is expert 0 (with distinct weights), 4 experts, top 2."""
    module = moe(top=2, experts=4, capacity=capacity, drop=drop)
    identity_router(module, 4)
    x = torch.randn(1, 16, CONFIG.d_model)
    x[..., 0] = torch.linspace(4.0, 6.0, 16)[torch.randperm(16)]
    return module, x


@pytest.mark.parametrize("drop", ["score", "position"])
def test_capacity_drops_the_overload(drop):
    module, x = overloaded(drop)
    kept = capacity_kept(module, x, drop)
    routing = module.router(x)
    assert (routing.experts[:, 0] == 0).all()
    first = kept[:, 0]
    assert first.sum() == 8  # capacity ceil(1.0 * 2 * 16 / 4) = 8 of expert 0's 16 first choices
    if drop == "position":
        assert first.tolist() == [True] * 8 + [False] * 8
    else:  # the 8 tokens with the largest weight on expert 0
        assert set(first.nonzero().flatten().tolist()) == set(routing.weights[:, 0].topk(8).indices.tolist())
    module.train()
    y, _ = module(x)
    close(y, reference(module, x, kept))
    metrics = module.finish_step()
    assert metrics["dropped"].item() == pytest.approx((~kept).sum().item() / 32)


def test_enough_capacity_drops_nothing():
    module, x = overloaded("score", capacity=2.0)  # 16 slots per expert: room for every token
    module.train()
    close(module(x)[0], reference(module, x))
    assert module.finish_step()["dropped"].item() == 0


def test_capacity_padding_is_computed_and_counted():
    seq_len, experts, top, capacity = 64, 8, 2, 1.25
    text = TINY + f"global ffn=moe(top={top}, experts={experts}, d_ff={D_FF}, capacity={capacity})"
    dropless = nanollm.compile(TINY + f"global ffn=moe(top={top}, experts={experts}, d_ff={D_FF})").analyze(seq_len)
    padded = nanollm.compile(text).analyze(seq_len)
    slots = math.ceil(capacity * top * seq_len / experts)  # 20 rows per expert, 160 > 128 routed rows
    expert_flops = 2 * 3 * 64 * D_FF
    assert padded.flops_per_token_fwd - dropless.flops_per_token_fwd == pytest.approx(
        (experts * slots - top * seq_len) * expert_flops / seq_len
    )


# --- losses --------------------------------------------------------------------------------------

LOGITS = [  # (B=2, T=3, E=4), no ties
    [[2.0, 1.0, 0.5, -1.0], [0.1, 3.0, -0.5, 1.2], [1.5, -0.3, 0.2, 2.2]],
    [[-1.0, 0.4, 2.5, 1.1], [3.1, 0.0, 1.7, -0.6], [0.3, 1.9, -1.2, 0.8]],
]


def hand_routing(kind: str, top: int) -> tuple[list[list[list[float]]], list[list[list[int]]]]:
    """Affinities (softmax, or sigmoid or sqrt(softplus) normalised to sum 1) and the top-k expert ids of LOGITS, in Python floats."""
    affinities, choices = [], []
    for sequence in LOGITS:
        affinities.append([])
        choices.append([])
        for row in sequence:
            if kind == "softmax":
                scores = [math.exp(v) / sum(math.exp(u) for u in row) for v in row]
            elif kind == "sigmoid":
                scores = [1 / (1 + math.exp(-v)) for v in row]
            else:
                scores = [math.sqrt(math.log1p(math.exp(v))) for v in row]
            affinities[-1].append([s / sum(scores) for s in scores])
            choices[-1].append(sorted(range(len(row)), key=lambda i: -scores[i])[:top])
    return affinities, choices


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "sqrt_softplus"])
@pytest.mark.parametrize("top", [1, 2])
def test_switch_aux_loss_by_hand(kind, top):
    aux, experts = 0.1, 4
    module = moe(top=top, experts=experts, router=kind, balance="aux", aux=aux)
    identity_router(module, experts)
    affinities, choices = hand_routing(kind, top)
    tokens = [(b, t) for b in range(2) for t in range(3)]
    f = [sum(e in choices[b][t] for b, t in tokens) / len(tokens) for e in range(experts)]
    p = [sum(affinities[b][t][e] for b, t in tokens) / len(tokens) for e in range(experts)]
    expected = aux * experts * sum(fi * pi for fi, pi in zip(f, p))
    _, loss = module(inputs_with_logits(LOGITS))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "sqrt_softplus"])
@pytest.mark.parametrize("top", [1, 2])
def test_sequence_aux_loss_by_hand(kind, top):
    """DeepSeek-V3: per sequence, f_i = E / (k T) * count_i, P_i = mean normalised affinity; mean over sequences."""
    aux, experts, length = 0.1, 4, 3
    module = moe(top=top, experts=experts, router=kind, balance="seq_aux", aux=aux)
    identity_router(module, experts)
    affinities, choices = hand_routing(kind, top)
    per_sequence = []
    for b in range(2):
        f = [experts / (top * length) * sum(e in choices[b][t] for t in range(length)) for e in range(experts)]
        p = [sum(affinities[b][t][e] for t in range(length)) / length for e in range(experts)]
        per_sequence.append(sum(fi * pi for fi, pi in zip(f, p)))
    _, loss = module(inputs_with_logits(LOGITS))
    assert loss.item() == pytest.approx(aux * sum(per_sequence) / 2, rel=1e-6)


def test_z_loss_by_hand():
    coefficient = 1e-3
    module = moe(top=2, experts=4, balance="none", z_loss=coefficient)
    identity_router(module, 4)
    rows = [row for sequence in LOGITS for row in sequence]
    expected = coefficient * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows) / len(rows)
    _, loss = module(inputs_with_logits(LOGITS))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("top,experts", ROUTINGS)
@pytest.mark.parametrize("aux", [0.01, 1.0])
def test_switch_aux_loss_matches_mixtral(top, experts, aux):
    module = moe(top=top, experts=experts, aux=aux)
    x = torch.randn(2, 16, CONFIG.d_model)
    _, loss = module(x)
    logits = module.router.weight @ x.reshape(-1, CONFIG.d_model).T
    expected = aux * load_balancing_loss_func((logits.T,), num_experts=experts, top_k=top)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("balance", ["none", "bias"])
def test_balance_without_a_loss_adds_nothing(balance):
    module = moe(top=2, experts=4, balance=balance)
    assert module(torch.randn(2, 8, CONFIG.d_model))[1].item() == 0


def test_jitter_perturbs_only_training_routing():
    module = moe(top=1, experts=8, jitter=0.5)
    x = torch.randn(4, 16, CONFIG.d_model)
    assert torch.equal(module(x)[0], module(x)[0])  # eval: no noise
    module.train()
    first, second = module.router(x).experts, module.router(x).experts
    assert not torch.equal(first, second)


# --- bias balancing ------------------------------------------------------------------------------


def test_selection_bias_chooses_but_does_not_weight():
    module = moe(top=1, experts=4, router="sigmoid", balance="bias", norm_topk=False)
    x = torch.randn(2, 8, CONFIG.d_model)
    with torch.no_grad():
        module.selection_bias[3] = 100.0
    routing = module.router(x, module.selection_bias)
    assert (routing.experts == 3).all()
    scores = torch.sigmoid(x.reshape(-1, CONFIG.d_model) @ module.router.weight.T)
    close(routing.weights[:, 0], scores[:, 3])


def test_bias_update_moves_load_towards_balance():
    rate = 0.05
    module = moe(top=1, experts=4, router="sigmoid", balance="bias", bias_rate=rate)
    module.train()
    identity_router(module, 4)
    x = torch.randn(4, 16, CONFIG.d_model)
    x[..., 0] = 4.0  # expert 0 is everyone's favourite
    loads = []
    for step in range(40):
        before = module.selection_bias.clone()
        module(x)
        load = module.finish_step()["load"]
        expected = before + rate * torch.sign(load.mean() - load)
        torch.testing.assert_close(module.selection_bias, expected)
        if step == 0:
            assert load[0] == 64 and module.selection_bias[0] == -rate and (module.selection_bias[1:] == rate).all()
        loads.append(load)
    assert loads[-1].max() < 0.5 * loads[0].max()
    assert module.state_dict()["selection_bias"].dtype == torch.float32  # persistent: checkpointed


def test_bias_stays_fp32_when_the_model_is_cast():
    module = moe(top=1, experts=4, balance="bias")
    with torch.no_grad():
        module.selection_bias.fill_(1.0 + 2**-20)  # not representable in bf16
    module.to(torch.bfloat16)
    assert module.gate_up.dtype == torch.bfloat16
    assert module.selection_bias.dtype == torch.float32 and module.selection_bias[0].item() == 1.0 + 2**-20
    assert module.statistics.dtype == torch.float64


# --- statistics ----------------------------------------------------------------------------------


def test_step_metrics_from_forward_passes():
    module = moe(top=2, experts=4, z_loss=1e-3)
    identity_router(module, 4)
    x = inputs_with_logits(LOGITS)
    _, choices = hand_routing("softmax", 2)
    load = [2 * sum(e in row for sequence in choices for row in sequence) for e in range(4)]  # x * 1.1 routes as x
    module.train()
    losses = [module(x)[1].item(), module(x * 1.1)[1].item()]
    module.eval()
    module(x)  # evaluation passes are not counted
    module.train()
    with recomputing():
        module(x)  # nor activation-checkpoint recomputes
    metrics = module.finish_step()
    assert metrics["load"].tolist() == load
    mean = sum(load) / 4
    assert metrics["max_load"].item() == pytest.approx(max(load) / mean)
    assert metrics["cv"].item() == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in load) / 4) / mean)
    usage = [v / sum(load) for v in load]
    assert metrics["entropy"].item() == pytest.approx(-sum(u * math.log(u) for u in usage if u) / math.log(4))
    assert metrics["dropped"].item() == 0
    assert metrics["balance_loss"].item() + metrics["z_loss"].item() == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert metrics["z_loss"].item() > 0
    empty = module.finish_step()  # a step without forward passes
    assert all(torch.isfinite(v).all() and (v == 0).all() for v in empty.values())
    assert set(empty) == {"load", "max_load", "cv", "entropy", "dropped", "balance_loss", "z_loss"}


def test_summary_of_a_run():
    module = moe(top=1, experts=4)
    steps = [
        {"load": torch.tensor([4.0, 0.0, 0.0, 0.0]), "dropped": torch.tensor(0.5), "balance_loss": torch.tensor(0.2), "z_loss": torch.tensor(0.0)},
        {"load": torch.tensor([0.0, 4.0, 4.0, 4.0]), "dropped": torch.tensor(0.1), "balance_loss": torch.tensor(0.4), "z_loss": torch.tensor(0.1)},
    ]
    totals = {key: sum(step[key] for step in steps) for key in steps[0]}
    row = module.summarize(totals, len(steps))
    assert row["max_load"] == pytest.approx(1.0) and row["cv"] == pytest.approx(0.0) and row["entropy"] == pytest.approx(1.0)
    assert row["dropped"] == pytest.approx(0.3) and row["balance_loss"] == pytest.approx(0.3) and row["z_loss"] == pytest.approx(0.05)


def test_accumulators_stay_out_of_checkpoints():
    assert "statistics" not in moe().state_dict()
    assert set(moe(balance="bias").state_dict()) == {"router.weight", "gate_up", "down", "selection_bias"}


# --- against transformers --------------------------------------------------------------------------


def from_block(call: nanollm.Call, theirs: torch.nn.Module):
    """Our component for `call`, carrying a transformers MoE block's weights through from_hf's own name mapping."""
    ours = make_component(call, CONFIG)
    names = ours.hf_weights()  # from_hf's own name mapping, relative to the block
    state = theirs.state_dict()
    assert set(names.values()) == set(state)
    ours.load_state_dict({name: state[hf_name] for name, hf_name in names.items()}, strict=True)
    return ours


@pytest.mark.parametrize("top,experts", ROUTINGS)
@pytest.mark.parametrize("norm_topk", [True, False])
def test_matches_qwen3_moe_block(top, experts, norm_topk):
    hf = Qwen3MoeConfig(
        hidden_size=CONFIG.d_model, moe_intermediate_size=D_FF, num_experts=experts, num_experts_per_tok=top,
        norm_topk_prob=norm_topk, experts_implementation="eager",
    )
    theirs = Qwen3MoeSparseMoeBlock(hf)
    for param in theirs.parameters():
        torch.nn.init.normal_(param, std=0.2)
    ours = from_block(moe_call(hf, CONFIG), theirs)
    x = torch.randn(2, 8, CONFIG.d_model)
    close(ours(x)[0], theirs(x))


@pytest.mark.parametrize("norm_topk", [True, False])
@pytest.mark.parametrize("groups,top_groups", [(4, 2), (1, 1), (8, 3)])
def test_matches_deepseek_v3_moe_block(norm_topk, groups, top_groups):
    """Sigmoid scores, group-limited top-k on score + correction bias, routed scaling, shared experts."""
    hf = DeepseekV3Config(
        hidden_size=CONFIG.d_model, moe_intermediate_size=D_FF, n_routed_experts=16, num_experts_per_tok=4,
        n_shared_experts=2, n_group=groups, topk_group=top_groups, routed_scaling_factor=2.5, norm_topk_prob=norm_topk,
        experts_implementation="eager",
    )
    call = moe_call(hf, CONFIG)
    args = call.kwargs()
    assert (args["router"], args["shared"], args["scale"], args["balance"]) == ("sigmoid", 2, 2.5, "bias")
    assert (args["groups"], args["top_groups"], args["norm_topk"]) == (groups, top_groups, norm_topk)
    theirs = DeepseekV3MoE(hf).eval()
    for param in theirs.parameters():
        torch.nn.init.normal_(param, std=0.2)
    torch.nn.init.normal_(theirs.gate.e_score_correction_bias, std=0.3)  # large enough to change choices
    ours = from_block(call, theirs)
    x = torch.randn(2, 8, CONFIG.d_model)
    expected = theirs(x)
    close(ours(x)[0], expected)
    with torch.no_grad():
        ours.selection_bias.zero_()
    assert not torch.allclose(ours(x)[0], expected, atol=1e-3)  # the bias really changed the routing


V4_LIMIT = 0.6  # small enough that the clamp acts on unit-scale activations


def v4_call(hashed: bool, config=CONFIG, experts: int = 8, top: int = 3):
    """DeepSeek-V4's MoE layer as the family adapter writes it (v4-interface): hash-routed or top-k routed."""
    return call("moe", "ffn", config, top=top, experts=experts, d_ff=D_FF, shared=1, router="sqrt_softplus", norm_topk=True,
                scale=1.5, balance="none" if hashed else "bias", limit=V4_LIMIT, hash=hashed)


@pytest.mark.parametrize("path", ["loop", "grouped"])
@pytest.mark.parametrize("layer", [0, 1], ids=["hash_moe", "moe"])
def test_matches_deepseek_v4_moe_block_with_its_clamps_active(monkeypatch, path, layer):
    """sqrt(softplus) scores, top-k on score + correction bias or the token's row of tid2eid, always renormalised,
    scaled by 1.5; clamped SwiGLU in the routed and the shared experts. Values and the input's gradient."""
    monkeypatch.setattr(dispatch, "use_grouped_mm", lambda rows: path == "grouped")
    hf = DeepseekV4Config(hidden_size=CONFIG.d_model, moe_intermediate_size=D_FF, n_routed_experts=8, num_experts_per_tok=3,
                          vocab_size=CONFIG.vocab_size, num_hidden_layers=2, mlp_layer_types=["hash_moe", "moe"], swiglu_limit=V4_LIMIT,
                          routed_scaling_factor=1.5, experts_implementation="eager")
    theirs = DeepseekV4SparseMoeBlock(hf, layer).eval()
    for param in theirs.parameters():
        torch.nn.init.normal_(param, std=0.2)
    hashed = theirs.is_hash
    if hashed:
        theirs.gate.tid2eid.copy_(torch.rand(CONFIG.vocab_size, 8).topk(3).indices)
    else:
        torch.nn.init.normal_(theirs.gate.e_score_correction_bias, std=0.3)  # large enough to change choices
    ours = from_block(v4_call(hashed), theirs)
    assert ours.inputs() == (("x", "token_ids") if hashed else ("x",))
    x = torch.randn(2, 8, CONFIG.d_model, requires_grad=True)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 8))
    flat = x.detach().flatten(0, 1)
    for gate, up in ((theirs.shared_experts.gate_proj(flat), theirs.shared_experts.up_proj(flat)),
                     (flat @ theirs.experts.gate_up_proj[0, :D_FF].T, flat @ theirs.experts.gate_up_proj[0, D_FF:].T)):
        assert (gate > V4_LIMIT).any() and (up.abs() > V4_LIMIT).any()
    expected = theirs(x, input_ids=ids)
    actual, _ = ours(x, ids) if hashed else ours(x)
    close(actual, expected)
    probe = torch.randn_like(expected)
    ours_dx, = torch.autograd.grad((actual * probe).sum(), x)
    theirs_dx, = torch.autograd.grad((expected * probe).sum(), x)
    close(ours_dx, theirs_dx)
    routing = ours.router(x.detach(), getattr(ours, "selection_bias", None), ids)
    assert routing.experts.unique().numel() == 8  # every expert hit
    if hashed:
        assert torch.equal(routing.experts, theirs.gate.tid2eid[ids.flatten()])
    else:
        with torch.no_grad():
            ours.selection_bias.zero_()
        assert not torch.allclose(ours(x)[0], expected, atol=1e-3)  # the bias really changed the routing


def test_hash_routing_reads_its_table_by_token_id_and_weights_the_choice_by_scores():
    module = moe(top=2, experts=8, router="sqrt_softplus", hash=True, balance="none", scale=1.5)
    table = module.router.token_experts
    assert table.dtype == torch.long and table.shape == (CONFIG.vocab_size, 2)
    assert (table[:, 0] != table[:, 1]).all() and table.unique().numel() == 8  # k distinct experts a token, every expert drawn
    assert "router.token_experts" in module.state_dict() and "router.token_experts" not in dict(module.named_parameters())
    ids = torch.randint(0, CONFIG.vocab_size, (2, 8))
    x, other = torch.randn(2, 2, 8, CONFIG.d_model).unbind()
    routing, moved = module.router(x, None, ids), module.router(other, None, ids)
    assert torch.equal(routing.experts, table[ids.flatten()]) and torch.equal(moved.experts, routing.experts)  # the input never chooses
    scores = F.softplus(x.flatten(0, 1) @ module.router.weight.T).sqrt().gather(1, routing.experts)
    close(routing.weights, 1.5 * scores / scores.sum(-1, keepdim=True))  # but weighs the choice
    assert not torch.allclose(moved.weights, routing.weights)
    module.to(torch.bfloat16)
    assert module.router.token_experts.dtype == torch.long and torch.equal(module.router.token_experts, table)


def test_a_model_with_hash_routed_layers_counts_as_top_k_routing_trains_and_decodes():
    """The table is a buffer, not a parameter, and the scores are computed for every expert either way: parameters and
    FLOPs equal top-k routing's; the router of a hash-routed layer is trained through the weights; decoding (token ids of the
    new tokens only) gives the full forward's logits."""
    ffn = "moe(top=2, experts=8, d_ff=32, shared=1, router=sqrt_softplus, scale=1.5, limit=7.0"
    text = TINY + "seq_len = 16\n" + f"global ffn={ffn}, balance=none, hash=true)\nglobal ffn={ffn}, balance=bias)\n"
    hashed, routed = nanollm.compile(text), nanollm.compile(text.replace("hash=true", "hash=false"))
    assert hashed.arch.layers[0].ffn.kwargs()["hash"] and not hashed.arch.layers[1].ffn.kwargs()["hash"]
    ours, theirs = hashed.analyze(16), routed.analyze(16)
    assert (ours.params_total, ours.params_active, ours.flops_per_token_fwd) == (theirs.params_total, theirs.params_active,
                                                                                theirs.flops_per_token_fwd)
    torch.manual_seed(0)
    model = hashed.build()
    sequence = torch.randint(0, 512, (2, 12))
    logits, _ = model(sequence)
    F.cross_entropy(logits.flatten(0, 1), sequence.flatten()).backward()
    assert model.get_parameter("layers.0.ffn.router.weight").grad.abs().sum() > 0
    model.eval()
    decoder = Decoder(model, hashed.arch, context=16)
    with torch.no_grad():
        full, _ = model(sequence)
        states = decoder.states(2, sequence.shape[1])
        steps = [decoder.step(sequence[:, :8], 0, states)] + [decoder.step(sequence[:, t:t + 1], t, states) for t in range(8, 12)]
    close(torch.cat(steps, dim=1), full)


# --- the language --------------------------------------------------------------------------------

TINY = "vocab_size = 512\nd_model = 64\nn_heads = 4\nn_kv_heads = 2\nhead_dim = 32\nd_ff = 96\n"


@pytest.mark.parametrize(
    "ffn, at, message, hint",
    [  # `at`: the text the error points at (a bad value, or the whole call when the combination is wrong)
        ("moe(router=sigmoyd)", "sigmoyd", "moe: unknown router 'sigmoyd'", "did you mean 'sigmoid'?"),
        ("moe(balance=seqaux)", "seqaux", "moe: unknown balance 'seqaux'", "did you mean 'seq_aux'?"),
        ("moe(balance=xyz)", "xyz", "moe: unknown balance 'xyz'", "balance takes: aux, seq_aux, none, bias"),
        ("moe(drop=first)", "first", "moe: unknown drop 'first'", "drop takes: score, position"),
        ("moe(capacity=-1.0)", "-1.0", "moe: capacity must be at least 0", None),
        ("moe(shared=-1)", "-1", "moe: shared must be at least 0", None),
        ("moe(experts=6, groups=4)", "moe", "moe: groups=4 does not divide experts=6", None),
        ("moe(experts=8, groups=2, top_groups=3)", "moe", "moe: top_groups=3 is more than groups=2", None),
        ("moe(top=5, experts=8, groups=4, top_groups=2)", "moe", "moe: top=5 is more than the 4 experts in top_groups=2 of groups=4", None),
        ("moe(jitter=1.0)", "moe", "moe: jitter=1.0 must be below 1", None),
        ("moe(hash=true, balance=bias)", "moe", "moe: hash=true chooses experts by a fixed table: balance=bias", None),
        ("moe(experts=8, groups=2, hash=true)", "moe", "moe: hash=true chooses experts by a fixed table: groups=2", None),
        ("moe(router=sqrt_softpls)", "sqrt_softpls", "moe: unknown router 'sqrt_softpls'", "did you mean 'sqrt_softplus'?"),
    ],
)
def test_invalid_settings_are_errors_at_their_position(ffn, at, message, hint):
    line = f"global ffn={ffn}"
    with pytest.raises(ArchError) as error:
        nanollm.compile(TINY + line)
    assert error.value.message.startswith(message)
    assert (error.value.pos.line, error.value.pos.col) == (TINY.count("\n") + 1, line.index(at) + 1)
    assert error.value.hint == hint


def test_analysis_counts_router_shared_and_active_experts():
    seq_len, d, top, experts, shared = 32, 64, 3, 16, 2
    dense = nanollm.compile(TINY + f"global ffn=swiglu(d_ff={D_FF})").analyze(seq_len)
    sparse = nanollm.compile(TINY + f"global ffn=moe(top={top}, experts={experts}, d_ff={D_FF}, shared={shared})").analyze(seq_len)
    expert = 3 * d * D_FF
    router = d * experts
    assert sparse.params_total - dense.params_total == router + (experts + shared) * expert - expert
    assert sparse.params_active - dense.params_active == router + (top + shared) * expert - expert
    # forward FLOPs per token: the router, the shared experts, and k routed experts (2 FLOPs per MAC)
    assert sparse.flops_per_token_fwd - dense.flops_per_token_fwd == pytest.approx(2 * (router + (top + shared - 1) * expert))
