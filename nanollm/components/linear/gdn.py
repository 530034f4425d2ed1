"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, arXiv 2412.06464), the linear mixer of Qwen3-Next, Qwen3.5 and OLMo-hybrid.

Per value head, a d_k x d_v state decays by a scalar a_t = exp(-exp(A_log) softplus(a(x) + dt_bias)) and takes a delta-rule
write of strength beta_t = sigmoid(b(x)) (2 sigmoid with `negative_eigenvalues`, OLMo-hybrid); queries and keys pass a
short causal convolution with v, are L2-normalised, and each key head serves heads / key_heads value heads. The output is
RMSNorm(o) * silu(z(x)) per head, then projected back. The three forms of the delta rule are in delta_rule.py.

`layout` only names and packs the projections as a transformers family stores them (the model computes the same):
separate (OLMo-hybrid: q/k/v/a/b/g_proj), qwen3_5 (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a) or qwen3_next
(in_proj_qkvz and in_proj_ba, grouped per key head).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...ir import MAX_WIDTH, Call, ModelConfig
from .. import Param, register, telling
from ..conv import CausalConv1d
from .delta_rule import DeltaRuleMixer, GatedRMSNorm, Gates

LAYOUTS = ("separate", "qwen3_5", "qwen3_next")

DELTA_PARAMS = (  # the head layout, convolution and chunk every delta-rule mixer takes, by name only
    Param("heads", int, "value heads, each with its own state, decay and beta", setting="n_heads", minimum=1, maximum=MAX_WIDTH,
          positional=False),
    Param("head_dim", int, "width of a query/key head (d_k)", setting="head_dim", minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("conv", int, "taps of the short causal convolution on q, k and v", default=4, minimum=1, maximum=64, positional=False),
    Param("chunk", int, "tokens per chunk of the parallel (training) form", default=64, minimum=1, maximum=4096, positional=False),
    Param("gate_eps", float, "epsilon of the gated output norm", setting="norm_eps", minimum=0, positional=False),
)


@register(
    "gdn",
    "mixer",
    *DELTA_PARAMS,
    Param("key_heads", int, "query/key heads, each shared by heads / key_heads value heads; 0 = heads", default=0, minimum=0,
          maximum=MAX_WIDTH, positional=False),
    Param("value_dim", int, "width of a value head (d_v); 0 = head_dim", default=0, minimum=0, maximum=MAX_WIDTH, positional=False),
    Param("negative_eigenvalues", bool, "beta = 2 sigmoid(b), so the state's transition may flip sign (OLMo-hybrid)", default=False,
          positional=False),
    Param("layout", str, "how the projections are packed and named: separate, qwen3_5 or qwen3_next (as transformers stores them)",
          default="separate", choices=LAYOUTS, positional=False),
)
class GatedDeltaNet(DeltaRuleMixer):
    """Gated DeltaNet: the delta rule with a scalar decay per head, short convolutions and a gated output norm."""

    hf_module = "linear_attn"

    def __init__(self, config: ModelConfig, heads: int, head_dim: int, conv: int, chunk: int, gate_eps: float, key_heads: int,
                 value_dim: int, negative_eigenvalues: bool, layout: str) -> None:
        super().__init__()
        self.setup(heads, key_heads or heads, head_dim, value_dim or head_dim, chunk)
        self.negative_eigenvalues, self.layout = negative_eigenvalues, layout
        d, keys, values = config.d_model, self.key_width, self.value_width
        widths = {
            "separate": {"q_proj": keys, "k_proj": keys, "v_proj": values, "g_proj": values, "b_proj": heads, "a_proj": heads},
            "qwen3_5": {"in_proj_qkv": 2 * keys + values, "in_proj_z": values, "in_proj_b": heads, "in_proj_a": heads},
            "qwen3_next": {"in_proj_qkvz": 2 * keys + 2 * values, "in_proj_ba": 2 * heads},
        }[layout]
        for name, width in widths.items():
            setattr(self, name, nn.Linear(d, width, bias=False))
        self.conv1d = CausalConv1d(2 * keys + values, conv)
        self.A_log = nn.Parameter(torch.empty(heads))
        self.dt_bias = nn.Parameter(torch.empty(heads))
        self.o_norm = GatedRMSNorm(self.value_dim, gate_eps, F.silu)
        self.o_proj = nn.Linear(values, d, bias=False)

    @classmethod
    def check(cls, config: ModelConfig, **args: Any) -> str | None:
        key_heads = args["key_heads"] or args["heads"]
        if args["heads"] % key_heads:
            return f"key_heads = {key_heads} does not divide heads = {args['heads']}"
        return None

    @classmethod
    def describe(cls, call: Call, config: ModelConfig) -> list[str]:
        args, shown = call.kwargs(), telling(call, config)
        key_heads, value_dim = args["key_heads"] or args["heads"], args["value_dim"] or args["head_dim"]
        return ([shown] if shown else []) + [f"{args['heads']} heads, {key_heads} key heads, state {args['head_dim']}x{value_dim}"]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, Gates]:
        batch, length, _ = x.shape
        if self.layout == "separate":
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
            z, b, a = self.g_proj(x), self.b_proj(x), self.a_proj(x)
        elif self.layout == "qwen3_5":
            qkv, z, b, a = self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
        else:  # per key head: [q, k, its group's v heads, their z], and [the group's b, their a]
            group_values = self.n_heads // self.key_heads * self.value_dim
            qkvz = self.in_proj_qkvz(x).view(batch, length, self.key_heads, -1)
            q, k, v, z = qkvz.split([self.head_dim, self.head_dim, group_values, group_values], dim=-1)
            qkv = torch.cat([t.reshape(batch, length, -1) for t in (q, k, v)], dim=-1)
            b, a = self.in_proj_ba(x).view(batch, length, self.key_heads, -1).chunk(2, dim=-1)
            b, a = b.reshape(batch, length, self.n_heads), a.reshape(batch, length, self.n_heads)
        beta = b.sigmoid() * (2.0 if self.negative_eigenvalues else 1.0)
        decay = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        return qkv, Gates(decay, beta, z.reshape(batch, length, self.n_heads, self.value_dim))

    def hf_weights(self) -> dict[str, str]:
        names = {name: name for name, _ in self.named_parameters()}
        if self.layout != "separate":  # the Qwens name the output projection and norm otherwise
            names.update({"o_proj.weight": "out_proj.weight", "o_norm.weight": "norm.weight"})
        return names
