"""Mixture of SwiGLU (or squared-ReLU) experts: token-choice top-k routing, optional shared experts, balancing, capacity.

The router (router.py) picks k of E experts per token (or reads them from a fixed table by token id: hash
routing); the dispatch (dispatch.py) runs each token through its experts, dropless by default. GPT-OSS's experts
are arguments too: biases on the router and on the experts, a clamped SwiGLU with a sigmoid slope and an offset
on up, and its weight layout (so that its weights load unchanged). Nemotron-H's experts are non-gated squared-ReLU
MLPs (`activation=relu2`). `shared` always-on experts (DeepSeekMoE) form one dense MLP of width shared * d_ff with
the routed experts' activation (DeepSeek-V4 clamps both), added unweighted. While training, every forward pass adds
its expert loads, drops and losses to buffers; `finish_step` turns them into the step's metrics and, under
balance=bias, nudges the selection bias towards balance (DeepSeek-V3).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...ir import Call, ModelConfig
from .. import (
    BRANCH,
    INIT_STD,
    MATRIX,
    TOKEN_IDS,
    VECTOR,
    Component,
    Input,
    Param,
    collects_statistics,
    register,
    sum_over_processes,
    telling,
    traced_shape,
)
from .dispatch import DROPS, ExpertActivation, ExpertBank, capacity_limited, dropless, expert_counts
from .relu2 import ReLU2
from .router import BALANCES, ROUTERS, Router
from .swiglu import SwiGLU

# Per-step accumulators, one float64 vector: the E expert loads, then these (float64 counts stay exact).
DROPPED, PASSES, BALANCE, Z_LOSS = range(4)
# How the expert weights are stored, as transformers stores them: stacked (E, 2f, d) with the gate rows first, and
# down (E, d, f) (Qwen3-MoE, Mixtral, DeepSeek); gpt_oss (E, d, 2f) with gate and up columns alternating, down (E, f, d).
LAYOUTS = ("stacked", "gpt_oss")
# The experts' MLP: gated SwiGLU (gate_up (E, 2f, d)), or Nemotron-H's non-gated down(relu(up x)^2) (up (E, f, d)).
ACTIVATIONS = ("swiglu", "relu2")


def grouped_mm_handle(inputs: list, outputs: list) -> int:
    """fvcore handle for aten::_grouped_mm (rows, K) x (groups, K, N): every row meets one group."""
    rows, inner = traced_shape(inputs[0])
    return rows * inner * traced_shape(inputs[1])[-1]


class SharedExperts(SwiGLU):
    """The always-on experts: one SwiGLU of width shared * d_ff, with the routed experts' activation (its clamp)."""

    def __init__(self, config: ModelConfig, d_ff: int, activation: ExpertActivation) -> None:
        super().__init__(config, d_ff)
        self.glu = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.glu(self.gate_proj(x), self.up_proj(x)))


class GatedSharedExperts(SharedExperts):
    """Shared experts whose output a learned gate scales per token: sigmoid(w . x) SwiGLU(x) (Qwen3-Next)."""

    def __init__(self, config: ModelConfig, d_ff: int, activation: ExpertActivation) -> None:
        super().__init__(config, d_ff, activation)
        self.token_gate = nn.Linear(config.d_model, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.token_gate(x)) * super().forward(x)


def load_metrics(load: torch.Tensor) -> dict[str, torch.Tensor]:
    """Balance of a vector of expert loads: max/mean, coefficient of variation, entropy / log E (all 0 if empty)."""
    load = load.double()
    mean = load.mean().clamp_min(1e-30)
    usage = load / load.sum().clamp_min(1e-30)
    entropy = torch.special.xlogy(usage, usage).sum().abs()  # -sum p log p >= 0; abs avoids printing -0.0
    return {
        "max_load": (load.max() / mean).float(),
        "cv": (load.std(correction=0) / mean).float(),
        "entropy": (entropy / math.log(load.numel()) if load.numel() > 1 else usage.sum()).float(),
    }


@register(
    "moe",
    "ffn",
    Param("top", int, "experts per token (k)", default=2, minimum=1),
    Param("experts", int, "routed experts (E)", default=8, minimum=1, maximum=1 << 16),
    Param("d_ff", int, "hidden width of each expert", setting="d_ff", minimum=1, width=True),
    Param("shared", int, "always-on shared experts, each of width d_ff", default=0, minimum=0),
    Param("shared_gate", bool, "scale the shared experts' output by sigmoid(w . x), a learned gate per token (Qwen3-Next)",
          default=False),
    Param("router", str, "scoring: softmax over experts, sigmoid or sqrt(softplus) per expert, or topk_softmax (softmax over the chosen k)",
          default="softmax", choices=ROUTERS),
    Param("hash", bool, "choose each token's k experts by a fixed random table of its token id, weights still from the scores "
          "(DeepSeek-V4's first layers)", default=False, positional=False),
    Param("norm_topk", bool, "renormalise the k routing weights to sum to 1", default=True),
    Param("scale", float, "factor on the routing weights (DeepSeek-V3's routed_scaling_factor)", default=1.0, minimum=0),
    Param("groups", int, "expert groups for group-limited routing (1 = off)", default=1, minimum=1),
    Param("top_groups", int, "groups a token may route to", default=1, minimum=1),
    Param("balance", str, "load balancing: aux, seq_aux, none or bias", default="aux", choices=BALANCES),
    Param("aux", float, "balance-loss coefficient (aux, seq_aux)", default=0.01, minimum=0),
    Param("bias_rate", float, "selection-bias update per step (bias)", default=0.001, minimum=0),
    Param("z_loss", float, "router z-loss coefficient", default=0.0, minimum=0),
    Param("jitter", float, "router-input noise while training: x * U(1 - jitter, 1 + jitter)", default=0.0, minimum=0),
    Param("capacity", float, "capacity factor; 0 = dropless", default=0.0, minimum=0),
    Param("drop", str, "which assignments go over capacity: lowest score, or latest position", default="score", choices=DROPS),
    Param("router_bias", bool, "a learned bias on the router logits (GPT-OSS)", default=False),
    Param("expert_bias", bool, "biases on the experts' projections (GPT-OSS)", default=False),
    Param("alpha", float, "the experts' gate is gate * sigmoid(alpha * gate): 1 is SiLU, GPT-OSS 1.702", default=1.0, minimum=0),
    Param("limit", float, "clamp the gate to <= limit and up to [-limit, limit], in the routed and shared experts (GPT-OSS: 7, "
          "DeepSeek-V4: 10); 0 is off", default=0.0, minimum=0),
    Param("up_offset", float, "added to up before the product, (up + offset) (GPT-OSS: 1)", default=0.0),
    Param("layout", str, "expert weight storage: stacked (E, 2f, d) gate rows first, or gpt_oss (E, d, 2f) gate/up interleaved",
          default="stacked", choices=LAYOUTS),
    Param("activation", str, "the experts' MLP: gated swiglu, or relu2, the non-gated down(relu(up x)^2) of Nemotron-H",
          default="swiglu", choices=ACTIVATIONS),
)
class MoE(Component):
    """Top-k routed mixture of SwiGLU or squared-ReLU experts (+ shared experts); returns (output, weighted router losses)."""

    outputs = ("out", "aux_loss")
    hf_module = "mlp"

    def __init__(
        self,
        config: ModelConfig,
        top: int,
        experts: int,
        d_ff: int,
        shared: int,
        shared_gate: bool,
        balance: str,
        bias_rate: float,
        capacity: float,
        drop: str,
        expert_bias: bool,
        alpha: float,
        limit: float,
        up_offset: float,
        layout: str,
        activation: str,
        **routing: Any,  # the Router's own arguments: router, hash, norm_topk, scale, groups, top_groups, aux, z_loss, jitter, router_bias
    ) -> None:
        super().__init__()
        self.top, self.experts, self.shared, self.balance = top, experts, shared, balance
        self.bias_rate, self.capacity, self.drop = bias_rate, capacity, drop
        # the gated experts' activation (its slope, clamp and offset); not gated: relu2
        self.glu, self.layout, self.gated = ExpertActivation(alpha, limit, up_offset), layout, activation == "swiglu"
        self.router = Router(config.d_model, experts, top, balance, vocab_size=config.vocab_size, **routing)
        d = config.d_model
        if activation == "relu2":  # up alone, (E, f, d), as transformers' NemotronHExperts
            self.gate_up = nn.Parameter(torch.empty(experts, d_ff, d))
            self.down = nn.Parameter(torch.empty(experts, d, d_ff))
        elif layout == "stacked":  # (E, out, in) stacks, as nn.Linear, transformers and torchtitan lay them out; gate_up = [gate; up]
            self.gate_up = nn.Parameter(torch.empty(experts, 2 * d_ff, d))
            self.down = nn.Parameter(torch.empty(experts, d, d_ff))
        else:  # (E, in, out), gate and up columns alternating, as transformers' GptOssExperts
            self.gate_up = nn.Parameter(torch.empty(experts, d, 2 * d_ff))
            self.down = nn.Parameter(torch.empty(experts, d_ff, d))
        self.gate_up_bias = nn.Parameter(torch.zeros(experts, 2 * d_ff)) if expert_bias else None
        self.down_bias = nn.Parameter(torch.zeros(experts, d)) if expert_bias else None
        if not shared:
            self.shared_experts = None
        elif not self.gated:
            self.shared_experts = ReLU2(config, shared * d_ff, bias=False)
        else:
            self.shared_experts = (GatedSharedExperts if shared_gate else SharedExperts)(config, shared * d_ff, self.glu)
        if balance == "bias":
            # Persistent (checkpointed) and kept fp32 by _apply: its updates are ~1e-3 steps that bf16 would round away.
            self.register_buffer("selection_bias", torch.zeros(experts, dtype=torch.float32))
        self.register_buffer("statistics", torch.zeros(experts + 4, dtype=torch.float64), persistent=False)

    @classmethod
    def check(cls, config: ModelConfig, **args: Any) -> str | None:
        top, experts, groups, top_groups = args["top"], args["experts"], args["groups"], args["top_groups"]
        if top > experts:
            return f"top={top} is more than experts={experts}"
        if experts % groups:
            return f"groups={groups} does not divide experts={experts}"
        if top_groups > groups:
            return f"top_groups={top_groups} is more than groups={groups}"
        if top > top_groups * (experts // groups):
            return f"top={top} is more than the {top_groups * (experts // groups)} experts in top_groups={top_groups} of groups={groups}"
        if args["hash"] and args["balance"] == "bias":
            return "hash=true chooses experts by a fixed table: balance=bias has no choice to bias (use none, aux or seq_aux)"
        if args["hash"] and groups > 1:
            return f"hash=true chooses experts by a fixed table: groups={groups} would limit no choice"
        if args["shared_gate"] and not args["shared"]:
            return "shared_gate needs shared experts (shared is 0)"
        if args["activation"] == "relu2":
            swiglu_only = {"shared_gate": False, "expert_bias": False, "alpha": 1.0, "limit": 0.0, "up_offset": 0.0, "layout": "stacked"}
            for name, default in swiglu_only.items():
                if args[name] != default:
                    return f"{name}={args[name]} needs activation=swiglu (relu2 experts have no gate)"
        if args["jitter"] >= 1:
            return f"jitter={args['jitter']} must be below 1 (the router input would change sign)"
        for name, width in (("d_ff", args["d_ff"]), ("d_model", config.d_model)):
            if width % 8:  # grouped_mm wants 16-byte-aligned rows, i.e. widths in multiples of 8 bf16 values
                return f"{name}={width} is not a multiple of 8, as the grouped expert matmuls need"
        return None

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up, std=INIT_STD)
        nn.init.normal_(self.down, std=INIT_STD)
        for bias in (self.gate_up_bias, self.down_bias):
            if bias is not None:
                nn.init.zeros_(bias)
        for buffer in self.buffers(recurse=False):
            buffer.zero_()

    def param_roles(self) -> dict[str, str]:
        biases = {name: VECTOR for name in ("gate_up_bias", "down_bias") if getattr(self, name) is not None}
        return {"gate_up": MATRIX, "down": MATRIX} | biases

    def bank(self) -> ExpertBank:
        """The experts as the dispatch takes them: (E, out, in) views of the weights, biases, activation."""
        gpt_oss = self.layout == "gpt_oss"
        gate_up, down = (self.gate_up.transpose(1, 2), self.down.transpose(1, 2)) if gpt_oss else (self.gate_up, self.down)
        return ExpertBank(gate_up, down, self.gate_up_bias, self.down_bias, gpt_oss, self.glu, self.gated)

    def inputs(self) -> tuple[Input, ...]:
        return (BRANCH, TOKEN_IDS) if self.router.token_experts is not None else (BRANCH,)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        routing = self.router(x.reshape(-1, x.shape[-2], x.shape[-1]), getattr(self, "selection_bias", None), token_ids)
        flat = x.reshape(-1, x.shape[-1])
        counts = expert_counts(routing.experts, self.experts)
        if self.capacity:
            y, dropped = capacity_limited(flat, routing.experts, counts, routing.weights, self.bank(), self.capacity, self.drop)
        else:
            y, dropped = dropless(flat, routing.experts, counts, routing.weights, self.bank()), None
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if collects_statistics(self):
            self.record(counts, dropped, routing.balance_loss, routing.z_loss)
        return y.view(x.shape), routing.balance_loss + routing.z_loss

    @torch.no_grad()
    def record(self, counts: torch.Tensor, dropped: torch.Tensor | None, balance: torch.Tensor, z_loss: torch.Tensor) -> None:
        """Add one forward pass's loads (assignments per expert), drops and losses to this step's accumulators."""
        dropped = dropped if dropped is not None else torch.zeros((), device=counts.device)
        extra = torch.stack([dropped.double(), torch.ones_like(balance, dtype=torch.float64), balance.double(), z_loss.double()])
        self.statistics += torch.cat([counts.double(), extra])

    def finish_step(self) -> dict[str, torch.Tensor]:
        totals = sum_over_processes(self.statistics)
        self.statistics.zero_()
        load, extra = totals[: self.experts], totals[self.experts :]
        if self.balance == "bias":  # DeepSeek-V3's auxiliary-loss-free balancing: b_i += rate * sign(mean load - load_i)
            self.selection_bias += self.bias_rate * torch.sign(load.mean() - load).float()
        passes = extra[PASSES].clamp_min(1)
        return {
            "load": load.float(),
            **load_metrics(load),
            "dropped": (extra[DROPPED] / load.sum().clamp_min(1)).float(),
            "balance_loss": (extra[BALANCE] / passes).float(),
            "z_loss": (extra[Z_LOSS] / passes).float(),
        }

    def summarize(self, totals: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
        row = {name: value.item() for name, value in load_metrics(totals["load"]).items()}
        return row | {name: totals[name].item() / max(steps, 1) for name in ("dropped", "balance_loss", "z_loss")}

    def _apply(self, fn: Callable, recurse: bool = True) -> MoE:
        # Casting the model (e.g. to bf16) must not cast the fp32 selection bias or the float64 statistics.
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:  # recast; copy the exact old values where they exist (not on meta)
                self._buffers[name] = new.to(old.dtype) if old.is_meta or new.is_meta else old.to(new.device)
        return self

    def active_params(self) -> int:
        expert = sum(p[0].numel() for p in (self.gate_up, self.down, self.gate_up_bias, self.down_bias) if p is not None)
        shared = sum(p.numel() for p in self.shared_experts.parameters()) if self.shared_experts is not None else 0
        return sum(p.numel() for p in self.router.parameters()) + shared + self.top * expert

    def flop_handles(self, seq_len: int) -> dict[str, Callable]:
        return {"aten::_grouped_mm": grouped_mm_handle}

    @classmethod
    def describe(cls, call: Call, config: ModelConfig) -> list[str]:
        return [telling(call, config, always=("experts", "top"))]  # a mixture reads as "top k of E experts", defaults or not

    def hf_weights(self) -> dict[str, str]:
        names = {
            "router.weight": "router.weight" if self.layout == "gpt_oss" else "gate.weight",
            "gate_up": "experts.gate_up_proj" if self.gated else "experts.up_proj",  # transformers' shape and layout
            "down": "experts.down_proj",
        }
        if self.router.bias is not None:
            names["router.bias"] = "router.bias" if self.layout == "gpt_oss" else "gate.bias"
        if self.gate_up_bias is not None:
            names |= {"gate_up_bias": "experts.gate_up_proj_bias", "down_bias": "experts.down_proj_bias"}
        if self.balance == "bias":
            names["selection_bias"] = "gate.e_score_correction_bias"
        if self.router.token_experts is not None:
            names["router.token_experts"] = "gate.tid2eid"
        if self.shared_experts is not None:
            # transformers' gated shared expert (Qwen2-MoE, Qwen3-Next) is `shared_expert`, its gate a sibling; DeepSeek's `shared_experts`
            gated = isinstance(self.shared_experts, GatedSharedExperts)
            names.update({f"shared_experts.{ours}": f"{'shared_expert' if gated else 'shared_experts'}.{theirs}"
                          for ours, theirs in self.shared_experts.hf_weights().items()})
            if gated:
                names["shared_experts.token_gate.weight"] = "shared_expert_gate.weight"
        return names

    def extra_repr(self) -> str:
        d_ff = self.down.shape[2 if self.layout == "stacked" else 1]
        return f"top={self.top}, experts={self.experts}, d_ff={d_ff}, shared={self.shared}, balance={self.balance}{'' if self.gated else ', relu2'}"
