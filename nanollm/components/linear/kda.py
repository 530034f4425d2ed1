"""KDA, Kimi Delta Attention (Kimi Linear, arXiv 2510.26692): gated DeltaNet with a decay per key channel.

The state of each head decays by diag(exp(g_t)), g_t = -exp(A_log[h]) softplus(f_b(f_a(x)) + dt_bias) per channel,
through a low-rank forget gate; beta = sigmoid(b(x)); the output is RMSNorm(o) * sigmoid(g_b(g_a(x))) per head, the
output gate low-rank too. Queries, keys and values share one width (head_dim); the convolution, normalisation and
the three forms of the delta rule are those of delta_rule.py. Weight names are transformers' KimiLinearDeltaAttention's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...ir import MAX_WIDTH, Call, ModelConfig
from .. import Param, register, telling
from ..conv import CausalConv1d
from .delta_rule import DeltaRuleMixer, GatedRMSNorm, Gates
from .gdn import DELTA_PARAMS


@register(
    "kda",
    "mixer",
    *DELTA_PARAMS,
    Param("gate_rank", int, "inner width of the low-rank forget and output gates; 0 = head_dim", default=0, minimum=0,
          maximum=MAX_WIDTH, positional=False),
)
class KimiDeltaAttention(DeltaRuleMixer):
    """Kimi Delta Attention: the delta rule with a decay per key channel, low-rank gates, a sigmoid-gated output norm."""

    hf_module = "self_attn"

    def __init__(self, config: ModelConfig, heads: int, head_dim: int, conv: int, chunk: int, gate_eps: float, gate_rank: int) -> None:
        super().__init__()
        self.setup(heads, heads, head_dim, head_dim, chunk)
        d, width, rank = config.d_model, heads * head_dim, gate_rank or head_dim
        self.q_proj = nn.Linear(d, width, bias=False)
        self.k_proj = nn.Linear(d, width, bias=False)
        self.v_proj = nn.Linear(d, width, bias=False)
        self.conv1d = CausalConv1d(3 * width, conv)
        self.f_a_proj = nn.Linear(d, rank, bias=False)
        self.f_b_proj = nn.Linear(rank, width, bias=False)
        self.A_log = nn.Parameter(torch.empty(1, 1, heads, 1))  # as Kimi stores it: broadcast over (B, T, H, d_k)
        self.dt_bias = nn.Parameter(torch.empty(width))
        self.b_proj = nn.Linear(d, heads, bias=False)
        self.g_a_proj = nn.Linear(d, rank, bias=False)
        self.g_b_proj = nn.Linear(rank, width, bias=False)
        self.o_norm = GatedRMSNorm(head_dim, gate_eps, torch.sigmoid)
        self.o_proj = nn.Linear(width, d, bias=False)

    @classmethod
    def describe(cls, call: Call, config: ModelConfig) -> list[str]:
        args, shown = call.kwargs(), telling(call, config)
        return ([shown] if shown else []) + [f"{args['heads']} heads, state {args['head_dim']}x{args['head_dim']}, decay per channel"]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, Gates]:
        batch, length, _ = x.shape
        heads = (batch, length, self.n_heads, self.head_dim)
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        forget = (self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()).view(heads)
        decay = -self.A_log.float().exp() * F.softplus(forget)
        output = self.g_b_proj(self.g_a_proj(x)).view(heads)
        return qkv, Gates(decay, self.b_proj(x).sigmoid(), output)

    def hf_weights(self) -> dict[str, str]:
        names = {name: name for name, _ in self.named_parameters()}
        names.update({name: f"forget_gate.{name}" for name in ("f_a_proj.weight", "f_b_proj.weight", "A_log", "dt_bias")})
        return names
