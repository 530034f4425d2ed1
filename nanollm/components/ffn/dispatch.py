"""Running routed tokens through their experts: dropless (grouped matmuls, or a loop over experts), or
capacity-limited batches.

Experts are SwiGLUs stored as (E, out, in) stacks, as transformers and torchtitan store them:
gate_up (E, 2f, d), whose first f rows are the gate, and down (E, d, f).

Dropless: the N*k (token, expert) assignments are sorted by expert, so each expert's rows are contiguous.
On GPUs, in the analysis and when compiling in bf16 (bf16 autocast included), two grouped matmuls
(torch._grouped_mm) run them all: shapes never depend on the routing, so the same code runs on the meta
device and fvcore counts exactly the routed rows. On CPUs a loop over experts is faster (bench/moe_dispatch.py): each expert's rows stay in
cache through its whole SwiGLU, where the grouped path streams every (N*k)-row intermediate through memory.
The loop is also the fallback under torch.compile in fp32, whose tracing of grouped_mm accepts only bf16.

Under autocast the experts' matmuls run in bf16 while x stays fp32: outputs are summed in x's dtype,
as transformers' MoE blocks do.

Capacity-limited: each expert takes at most C = ceil(capacity * k * N / E) assignments; the rest are
dropped (their output is 0, so the residual stream carries those tokens). The experts then run as one
batched matmul over an (E, C, d) buffer, empty slots included: that padding is computed, and counted.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DROPS = ("score", "position")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's where it is on for x's device, else x's own."""
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)  # none on meta
    return torch.get_autocast_dtype(device) if autocast else x.dtype


def use_grouped_mm(x: torch.Tensor) -> bool:
    """Grouped matmuls on the meta device (the analysis: the loop needs values), for bf16 under torch.compile
    (its tracing of grouped_mm takes nothing else; bf16 autocast counts) and eagerly on GPUs; the expert loop
    otherwise."""
    if x.is_meta:
        return True
    if torch.compiler.is_compiling():
        return compute_dtype(x) == torch.bfloat16
    return x.device.type == "cuda"


def weighted_swiglu(gate: torch.Tensor, up: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up * weight. Weighting the hidden rows, not the d_model-wide outputs (down is linear),
    touches d_ff / d_model of the memory."""
    return F.silu(gate) * up * weights.unsqueeze(-1).to(up.dtype)


@torch._disable_dynamo  # its shapes depend on the routing: run eagerly, between compiled graphs (dynamo loaded only then)
def expert_loop(x: torch.Tensor, token: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per expert: its rows of x (token ids sorted by expert, counts[e] for expert e), its weighted SwiGLU,
    added back into the output."""
    sizes = counts.tolist()
    y = torch.zeros_like(x)
    rows = x.index_select(0, token)  # one gather for all experts: its backward is one scatter, not E
    # unbind, not gate_up[e]: indexing one expert per step would make backward build E full-size weight gradients
    for ids, part, weight, expert_gate_up, expert_down in zip(
        token.split(sizes), rows.split(sizes), weights.split(sizes), gate_up.unbind(), down.unbind()
    ):
        gate, up = F.linear(part, expert_gate_up).chunk(2, dim=-1)
        y.index_add_(0, ids, F.linear(weighted_swiglu(gate, up, weight), expert_down).to(y.dtype))
    return y


def expert_counts(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert (E,) of a routing (N, k)."""
    flat = experts.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=experts.device).scatter_add_(0, flat, torch.ones_like(flat))


def dropless(x: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
             down: torch.Tensor) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{experts[t, j]}(x[t]) for tokens x (N, d), routing (N, k) with its expert counts."""
    order = experts.flatten().argsort(stable=True)
    token = order // experts.shape[1]
    weights = weights.flatten()[order]
    if not use_grouped_mm(x):
        return expert_loop(x, token, weights, gate_up, down, counts)
    offsets = counts.cumsum(0).to(torch.int32)
    dtype = compute_dtype(x)  # cast as autocast would: not every autocast casts grouped_mm's operands
    rows = x.index_select(0, token).to(dtype)
    gate, up = F.grouped_mm(rows, gate_up.transpose(1, 2).to(dtype), offs=offsets).chunk(2, dim=-1)
    out = F.grouped_mm(weighted_swiglu(gate, up, weights), down.transpose(1, 2).to(dtype), offs=offsets)
    return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))


def capacity_limited(
    x: torch.Tensor,
    experts: torch.Tensor,
    counts: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    capacity: float,
    drop: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `dropless`, but each expert keeps at most ceil(capacity * k * N / E) assignments.

    drop="score" keeps each expert's highest-weighted assignments (batch-prioritised routing);
    drop="position" keeps first choices before second ones, earlier tokens first (Switch, GShard).
    Returns the output and the number of dropped assignments.
    """
    tokens, top = experts.shape
    n_experts = gate_up.shape[0]
    slots = math.ceil(capacity * top * tokens / n_experts)
    if drop == "score":
        priority = weights.detach().flatten().argsort(descending=True, stable=True)
    else:
        priority = torch.arange(tokens * top, device=x.device).view(tokens, top).t().flatten()
    flat = experts.flatten()
    order = priority[flat[priority].argsort(stable=True)]  # by expert, by priority within an expert
    expert = flat[order]
    rank = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts)[expert]
    kept = rank < slots
    # Buffer position of each assignment; every dropped one goes to a spare slot at the end, cut off below.
    slot = torch.where(kept, expert * slots + rank, n_experts * slots)
    empty = tokens  # the token index of an empty slot: it reads, and writes to, a spare zero row
    slot_token = torch.full((n_experts * slots + 1,), empty, device=x.device).scatter(0, slot, order // top)[:-1]
    slot_weight = weights.new_zeros(n_experts * slots + 1).scatter(0, slot, weights.flatten()[order])[:-1]
    rows = F.pad(x, (0, 0, 0, 1)).index_select(0, slot_token).view(n_experts, slots, -1)
    gate, up = torch.bmm(rows, gate_up.transpose(1, 2)).chunk(2, dim=-1)
    hidden = weighted_swiglu(gate, up, slot_weight.view(n_experts, slots))
    out = torch.bmm(hidden, down.transpose(1, 2)).flatten(0, 1)
    y = x.new_zeros(tokens + 1, x.shape[-1]).index_add_(0, slot_token, out.to(x.dtype))[:-1]
    return y, (~kept).sum()
