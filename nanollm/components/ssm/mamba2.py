"""Mamba-2 (Dao & Gu 2024, state-space duality): the selective state-space mixer of Nemotron-H.

in_proj(x) -> [z | xBC | dt]; xBC through a depthwise causal convolution and SiLU -> [x | B | C], B and C one
per group of heads. Per head h: dt = max(softplus(dt + dt_bias), dt_min), A = -exp(A_log), and the state
h_t = exp(dt_t A) h_{t-1} + dt_t B_t^T x_t, y_t = C_t h_t + D x_t: `scalar_decay`'s recurrence with q = C, k = B,
v = dt x and log-decay dt A, chunked for training and prefill, one `step` per decoded token. The output is RMS-normed per group after
the SiLU gate z (norm(y * SiLU(z)), as Nemotron-H) and projected back.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...ir import MAX_WIDTH, Call, ModelConfig
from .. import Component, Param, register, telling
from ..conv import CausalConv1d
from ..linear import scalar_decay
from . import segment_length

DT_INIT = (1e-3, 1e-1)  # Mamba's initial time steps, log-uniform in this range


class GroupGatedRMSNorm(nn.Module):
    """weight * rmsnorm(y * SiLU(z)) over each of `groups` equal slices of the channels, in fp32."""

    def __init__(self, width: int, groups: int, eps: float) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.empty(width))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gated = y.float() * F.silu(z.float())
        grouped = gated.view(*gated.shape[:-1], self.groups, -1)
        normed = F.rms_norm(grouped, (grouped.shape[-1],), eps=self.eps).view(gated.shape)
        return self.weight * normed.to(y.dtype)


@register(
    "mamba2",
    "mixer",
    Param("heads", int, "SSM heads", default=32, minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("head_dim", int, "channels per head (P); heads x head_dim is the inner width", default=64, minimum=1, maximum=MAX_WIDTH,
          positional=False),
    Param("state", int, "state size per head (N)", default=128, minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("groups", int, "groups of heads sharing B and C", default=8, minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("conv", int, "causal convolution kernel over [x | B | C]", default=4, minimum=1, maximum=1 << 10, positional=False),
    Param("chunk", int, "tokens per chunk of the chunked (training) form", default=128, minimum=1, maximum=1 << 16, positional=False),
    Param("dt_min", float, "floor of the time step after softplus", default=1e-3, minimum=0, positional=False),
    Param("conv_bias", bool, "bias on the convolution", default=True, positional=False),
    Param("bias", bool, "biases on in_proj and out_proj", default=False, positional=False),
)
class Mamba2(Component):
    """Selective state space (SSD), chunked, with its convolution, grouped B/C, D skip and gated group norm."""

    hf_module = "mixer"
    fixed_state = True

    def __init__(self, config: ModelConfig, heads: int, head_dim: int, state: int, groups: int, conv: int, chunk: int, dt_min: float,
                 conv_bias: bool, bias: bool) -> None:
        super().__init__()
        self.heads, self.head_dim, self.state_size, self.groups, self.chunk, self.dt_min = heads, head_dim, state, groups, chunk, dt_min
        self.inner = heads * head_dim
        self.conv_width = self.inner + 2 * groups * state
        self.in_proj = nn.Linear(config.d_model, self.inner + self.conv_width + heads, bias=bias)
        self.conv1d = CausalConv1d(self.conv_width, conv, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(heads))
        self.A_log = nn.Parameter(torch.empty(heads))
        self.D = nn.Parameter(torch.empty(heads))
        self.norm = GroupGatedRMSNorm(self.inner, groups, config.norm_eps)
        self.out_proj = nn.Linear(self.inner, config.d_model, bias=bias)

    @classmethod
    def check(cls, config: ModelConfig, **args: Any) -> str | None:
        if args["heads"] % args["groups"]:
            return f"groups = {args['groups']} does not divide heads = {args['heads']}"
        return None

    @classmethod
    def describe(cls, call: Call, config: ModelConfig) -> list[str]:
        args, shown = call.kwargs(), telling(call, config, always=("heads", "head_dim", "state"))
        return [shown, f"state {args['heads']}x{args['head_dim']}x{args['state']}, conv {args['conv']}"]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation: A = 1..H, D = 1, dt_bias the inverse softplus of log-uniform initial time steps."""
        self.A_log.copy_(torch.arange(1, self.heads + 1, dtype=torch.float32).log())
        nn.init.ones_(self.D)
        low, high = (math.log(t) for t in DT_INIT)
        dt = torch.empty(self.heads, dtype=torch.float32).uniform_(low, high).exp().clamp_min(self.dt_min)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def split(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z, xBC, dt of in_proj's output."""
        return projected.split([self.inner, self.conv_width, self.heads], dim=-1)

    def scan_inputs(self, xbc: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q = C, k = B (one per group of heads: the scan computes C B^T once per group), v = dt x, g = dt A and x,
        heads (groups for q, k) last but one (..., H, .), of xBC after the convolution (..., conv_width) and the raw dt (..., H)."""
        x, b, c = xbc.split([self.inner, self.groups * self.state_size, self.groups * self.state_size], dim=-1)
        lead = x.shape[:-1]
        dt = F.softplus((dt + self.dt_bias).float()).clamp_min(self.dt_min)
        x = x.reshape(*lead, self.heads, self.head_dim)
        b, c = (t.reshape(*lead, self.groups, self.state_size) for t in (b, c))
        g = dt * -self.A_log.float().exp()
        v = x * dt[..., None].to(x.dtype)
        return c, b, v, g, x

    def output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """out_proj(norm((y + D x) * SiLU(z))) of the heads' outputs y and inputs x (..., H, P)."""
        y = y + self.D.to(y.dtype)[:, None] * x
        return self.out_proj(self.norm(y.flatten(-2), z))

    def forward(self, x: torch.Tensor, form: Any = scalar_decay.chunked) -> torch.Tensor:
        span = segment_length(x, self.in_proj.out_features, self.chunk)
        if x.shape[1] <= span or x.is_meta:  # on meta (the analysis) one pass: the same products, a shorter trace
            return self.scan(x, self.conv1d, form, None)[0]
        # segments of whole chunks (LAYER_SEGMENT_BYTES), the convolution's inputs and the SSM state carried
        outs, state, pasts = [], None, [x.new_zeros(x.shape[0], 0, self.conv_width)]
        for start in range(0, x.shape[1], span):
            out, state = self.scan(x[:, start:start + span], functools.partial(self.conv1d.continuing, pasts), form, state)
            outs.append(out)
        return torch.cat(outs, dim=1)

    def scan(self, x: torch.Tensor, convolve: Any, form: Any, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixer's output over x (B, T, d_model), xBC through `convolve`, the scan in `form` from `state` (None: zeros);
        with the final SSM state."""
        z, xbc, dt = self.split(self.in_proj(x))
        q, k, v, g, inputs = self.scan_inputs(F.silu(convolve(xbc)), dt)
        y, final = form(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g.transpose(1, 2), self.chunk, state)
        return self.output(y.transpose(1, 2), inputs, z), final

    def state(self, batch: int, capacity: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The convolution's last inputs and the SSM state (H, N, P), whatever the capacity."""
        return {"conv": self.conv1d.state(batch, device, dtype),
                "recurrent": torch.zeros(batch, self.heads, self.state_size, self.head_dim, device=device, dtype=dtype)}

    def decode(self, state: dict[str, torch.Tensor], start: int, x: torch.Tensor) -> torch.Tensor:
        # a prefill chunk in the chunked form from the carried state, a single token by the recurrence
        form = scalar_decay.chunked if x.shape[1] > 1 else scalar_decay.recurrent
        out, final = self.scan(x, functools.partial(self.conv1d.decode, past=state["conv"]), form, state["recurrent"])
        state["recurrent"].copy_(final)
        return out

    def cache_elements(self, seq_len: int) -> int:
        return self.heads * self.head_dim * self.state_size + self.conv_width * (self.conv1d.span - 1)

    def hf_weights(self) -> dict[str, str]:
        return {name: name for name, _ in self.named_parameters()}  # in_proj, conv1d, dt_bias, A_log, D, norm, out_proj

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, state={self.state_size}, groups={self.groups}, chunk={self.chunk}"
