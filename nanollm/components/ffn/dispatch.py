"""Running routed tokens through their experts: dropless (grouped matmuls, or a loop over experts), or
capacity-limited batches.

Experts are SwiGLUs (or Nemotron-H's non-gated squared-ReLU MLPs) seen as (E, out, in) stacks (`ExpertBank`), as
transformers and torchtitan store them:
gate_up (E, 2f, d), whose first f rows are the gate, and down (E, d, f); or as GPT-OSS's, with gate and up rows
alternating, biases on both projections and a clamped, shifted activation (`ExpertActivation`).

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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ExpertActivation:
    """The experts' gated activation gate * sigmoid(alpha * gate) * (up + up_offset), the gate clamped to <= limit and
    up to [-limit, limit] when limit > 0 (GPT-OSS, DeepSeek-V4); alpha 1 and no limit nor offset is SwiGLU's."""

    alpha: float = 1.0
    limit: float = 0.0
    up_offset: float = 0.0

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.limit:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        glu = F.silu(gate) if self.alpha == 1.0 else gate * torch.sigmoid(self.alpha * gate)
        return glu * (up + self.up_offset if self.up_offset else up)


@dataclass(frozen=True)
class ExpertBank:
    """The routed experts: weights as (E, out, in) stacks (views of however the MoE stores them), optional biases,
    and their activation; or, not gated, relu(up)^2 (Nemotron-H)."""

    gate_up: torch.Tensor  # (E, 2f, d); (E, f, d) not gated
    down: torch.Tensor  # (E, d, f)
    gate_up_bias: torch.Tensor | None = None  # (E, 2f)
    down_bias: torch.Tensor | None = None  # (E, d)
    interleaved: bool = False  # gate and up rows alternate (GPT-OSS) rather than gate rows first
    activation: ExpertActivation = ExpertActivation()
    gated: bool = True  # False: gate_up is up alone (E, f, d), the activation relu(up)^2 (Nemotron-H)

    def hidden(self, gate_up: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The weighted activation of gate_up rows (..., 2f) whose routing weights are `weights` (...). Weighting
        the hidden rows, not the d_model-wide outputs (down is linear), touches d_ff / d_model of the memory."""
        if not self.gated:
            return F.relu(gate_up).square() * weights.unsqueeze(-1).to(gate_up.dtype)
        gate, up = (gate_up[..., ::2], gate_up[..., 1::2]) if self.interleaved else gate_up.chunk(2, dim=-1)
        return self.activation(gate, up) * weights.unsqueeze(-1).to(up.dtype)

    def down_bias_term(self, expert: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | int:
        """The down projection's bias of each row's expert, weighted as the row is (0 without biases)."""
        return 0 if self.down_bias is None else self.down_bias[expert] * weights.unsqueeze(-1).to(self.down_bias.dtype)


@torch._disable_dynamo  # its shapes depend on the routing: run eagerly, between compiled graphs (dynamo loaded only then)
def expert_loop(x: torch.Tensor, token: torch.Tensor, weights: torch.Tensor, bank: ExpertBank, counts: torch.Tensor) -> torch.Tensor:
    """Per expert: its rows of x (token ids sorted by expert, counts[e] for expert e), its weighted activation,
    added back into the output."""
    sizes = counts.tolist()
    y = torch.zeros_like(x)
    rows = x.index_select(0, token)  # one gather for all experts: its backward is one scatter, not E
    experts = len(sizes)
    # unbind, not gate_up[e]: indexing one expert per step would make backward build E full-size weight gradients
    gate_up_biases = bank.gate_up_bias.unbind() if bank.gate_up_bias is not None else [None] * experts
    down_biases = bank.down_bias.unbind() if bank.down_bias is not None else [None] * experts
    for ids, part, weight, expert_gate_up, expert_down, gate_up_bias, down_bias in zip(
        token.split(sizes), rows.split(sizes), weights.split(sizes), bank.gate_up.unbind(), bank.down.unbind(), gate_up_biases, down_biases
    ):
        out = F.linear(bank.hidden(F.linear(part, expert_gate_up, gate_up_bias), weight), expert_down)
        if down_bias is not None:
            out = out + weight.unsqueeze(-1) * down_bias
        y.index_add_(0, ids, out.to(y.dtype))
    return y


def expert_counts(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert (E,) of a routing (N, k)."""
    flat = experts.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=experts.device).scatter_add_(0, flat, torch.ones_like(flat))


def dropless(x: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor, bank: ExpertBank) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{experts[t, j]}(x[t]) for tokens x (N, d), routing (N, k) with its expert counts."""
    order = experts.flatten().argsort(stable=True)
    token = order // experts.shape[1]
    weights = weights.flatten()[order]
    if not use_grouped_mm(x):
        return expert_loop(x, token, weights, bank, counts)
    offsets = counts.cumsum(0).to(torch.int32)
    dtype = compute_dtype(x)  # cast as autocast would: not every autocast casts grouped_mm's operands
    rows = x.index_select(0, token).to(dtype)
    expert = experts.flatten()[order]
    gate_up = F.grouped_mm(rows, bank.gate_up.transpose(1, 2).to(dtype), offs=offsets)
    if bank.gate_up_bias is not None:
        gate_up = gate_up + bank.gate_up_bias[expert].to(dtype)
    out = F.grouped_mm(bank.hidden(gate_up, weights), bank.down.transpose(1, 2).to(dtype), offs=offsets)
    out = out + bank.down_bias_term(expert, weights)
    return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))


def capacity_limited(
    x: torch.Tensor,
    experts: torch.Tensor,
    counts: torch.Tensor,
    weights: torch.Tensor,
    bank: ExpertBank,
    capacity: float,
    drop: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `dropless`, but each expert keeps at most ceil(capacity * k * N / E) assignments.

    drop="score" keeps each expert's highest-weighted assignments (batch-prioritised routing);
    drop="position" keeps first choices before second ones, earlier tokens first (Switch, GShard).
    Returns the output and the number of dropped assignments.
    """
    tokens, top = experts.shape
    n_experts = bank.gate_up.shape[0]
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
    gate_up = torch.bmm(rows, bank.gate_up.transpose(1, 2))
    if bank.gate_up_bias is not None:
        gate_up = gate_up + bank.gate_up_bias.unsqueeze(1)
    hidden = bank.hidden(gate_up, slot_weight.view(n_experts, slots))
    out = torch.bmm(hidden, bank.down.transpose(1, 2)).flatten(0, 1)
    out = out + bank.down_bias_term(torch.arange(n_experts, device=x.device).repeat_interleave(slots), slot_weight)  # empty slots weigh 0
    y = x.new_zeros(tokens + 1, x.shape[-1]).index_add_(0, slot_token, out.to(x.dtype))[:-1]
    return y, (~kept).sum()
