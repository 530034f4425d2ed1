"""Top-k softmax-routed mixture of SwiGLU experts with a Switch-style load-balancing loss.

Routing follows Mixtral/Qwen3-MoE: softmax over all experts in fp32, keep the top k, optionally
renormalise their weights. Dispatch is dropless: the N*k (token, expert) assignments are sorted by
expert and run through two grouped matmuls, so shapes never depend on the routing (the same code
runs on the meta device, and fvcore sees exactly the active expert compute).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from fvcore.nn.jit_handles import get_shape
from torch import nn

from .. import INIT_STD, Component, Param, register
from ...ir import ModelConfig


def grouped_mm_handle(inputs: list, outputs: list) -> int:
    """fvcore handle for aten::_grouped_mm (rows, K) x (groups, K, N): every row meets one group."""
    rows, inner = get_shape(inputs[0])
    return rows * inner * get_shape(inputs[1])[-1]


@register(
    "moe",
    "ffn",
    Param("top", int, "experts per token (k)", default=2, minimum=1),
    Param("experts", int, "routed experts (E)", default=8, minimum=1),
    Param("d_ff", int, "hidden width of each expert", default="d_ff", minimum=1, width=True),
    Param("aux", float, "load-balancing loss coefficient", default=0.01, minimum=0),
    Param("norm_topk", bool, "renormalise the k routing weights to sum to 1", default=True),
)
class MoE(Component):
    """Dropless top-k MoE of SwiGLU experts; returns (output, weighted balance loss)."""

    returns_aux = True

    def __init__(self, config: ModelConfig, top: int, experts: int, d_ff: int, aux: float, norm_topk: bool) -> None:
        super().__init__()
        self.top, self.experts, self.aux, self.norm_topk = top, experts, aux, norm_topk
        self.router = nn.Linear(config.d_model, experts, bias=False)
        # (E, in, out) layouts, as grouped_mm takes them; gate and up are the two halves of gate_up.
        self.gate_up = nn.Parameter(torch.empty(experts, config.d_model, 2 * d_ff))
        self.down = nn.Parameter(torch.empty(experts, d_ff, config.d_model))

    @classmethod
    def check(cls, config: ModelConfig, **args: Any) -> str | None:
        if args["top"] > args["experts"]:
            return f"top={args['top']} is more than experts={args['experts']}"
        for name, width in (("d_ff", args["d_ff"]), ("d_model", config.d_model)):
            if width % 8:  # grouped_mm wants 16-byte-aligned rows, i.e. widths in multiples of 8 bf16 values
                return f"{name}={width} is not a multiple of 8, as the grouped expert matmuls need"
        return None

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up, std=INIT_STD)
        nn.init.normal_(self.down, std=INIT_STD)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities (N, E) in fp32, and the top-k weights and expert ids (N, k)."""
        probs = self.router(x).float().softmax(dim=-1)
        weights, experts = probs.topk(self.top, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, experts

    def balance_loss(self, probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Switch/GShard loss aux * E * sum_i f_i P_i, f_i = assignments to i per token, P_i = mean probability."""
        fraction = counts.float() / probs.shape[0]
        return self.aux * self.experts * (fraction * probs.mean(dim=0)).sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, weights, experts = self.route(x)
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        token = order // self.top
        counts = torch.zeros(self.experts, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = F.grouped_mm(x[token], self.gate_up, offs=offsets).chunk(2, dim=-1)
        out = F.grouped_mm(F.silu(gate) * up, self.down, offs=offsets)
        out = out * weights.flatten()[order].unsqueeze(-1).to(out.dtype)
        y = torch.zeros_like(x).index_add_(0, token, out)
        return y.view(shape), self.balance_loss(probs, counts)

    def active_params(self) -> int:
        expert = self.gate_up[0].numel() + self.down[0].numel()
        return self.router.weight.numel() + self.top * expert

    def flop_handles(self, seq_len: int) -> dict[str, Callable]:
        return {"aten::_grouped_mm": grouped_mm_handle}

    def extra_repr(self) -> str:
        return f"top={self.top}, experts={self.experts}, d_ff={self.down.shape[1]}, aux={self.aux}, norm_topk={self.norm_topk}"


def moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Plain reference: for every token, the weighted sum of its k experts, one token at a time."""
    flat = x.reshape(-1, x.shape[-1])
    _, weights, experts = moe.route(flat)
    d_ff = moe.down.shape[1]
    rows = []
    for token in range(flat.shape[0]):
        total = torch.zeros_like(flat[token])
        for slot in range(moe.top):
            e = experts[token, slot]
            hidden = flat[token] @ moe.gate_up[e]
            total = total + weights[token, slot].to(x.dtype) * ((F.silu(hidden[:d_ff]) * hidden[d_ff:]) @ moe.down[e])
        rows.append(total)
    return torch.stack(rows).view(x.shape)
