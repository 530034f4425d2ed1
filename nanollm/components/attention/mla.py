"""Multi-head latent attention (`mla`, DeepSeek-V2/V3): keys and values come from one low-rank latent per token.

Per token, `kv_a_proj_with_mqa` makes a latent c (`kv_lora_rank` wide, normed) and one RoPE key shared by all
heads (`qk_rope_head_dim`); `kv_b_proj` decompresses c into each head's no-RoPE key (`qk_nope_head_dim`) and
value (`v_head_dim`). Queries come from the input directly (`q_lora_rank` = 0) or through their own normed
latent. Only c and the RoPE key are cached: `kv_lora_rank + qk_rope_head_dim` elements per token and layer.

Two forms compute the same function. The training form decompresses keys and values and attends per head
(fewer products over a long prefix). The absorbed form (`absorb=true`) folds kv_b_proj's key half into the
query and its value half into the output, and attends over the latents directly, all heads sharing one key and
value (multi-query attention of width kv_lora_rank + qk_rope_head_dim): what decoding from the latent cache does.
The analysis counts whichever form the call names.

Decoding (`state`/`decode`) always runs the absorbed form over the latent cache, whichever form the call names: per
token it stores [normed latent | rotated RoPE key] and never a decompressed key or value; the new queries score
that cache as one shared key, and its first kv_lora_rank channels are the shared value.

The logit scale is 1/sqrt(qk_nope_head_dim + qk_rope_head_dim) (or `scale`), times DeepSeek-V3's YaRN
correction mscale(factor, mscale_all_dim)^2 when the encoding is YaRN with mscale_all_dim set, as transformers does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import BRANCH, REGISTRY, Component, Input, Param, Rotary, make_norm, register, telling
from ...ir import MAX_WIDTH, Call, ModelConfig
from ..position.rope import rotate
from ..position.yarn import mscale
from .causal import GATES, apply_gate, attend, attend_visible, sdpa_handle

# the output gates, G4 on the query projection and G5 on o_proj's output; no gate on keys or values: they are decompressed from
# the cached latent, and a gate varying per key token would keep the absorbed form (and decoding) from attending over the latent
MLA_GATES = (*GATES, "query", "output")

MLA_PARAMS = (
    Param("heads", int, "query heads", setting="n_heads", minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("kv_lora_rank", int, "width of the key/value latent (the cache)", default=512, minimum=1, maximum=MAX_WIDTH, width=True),
    Param("q_lora_rank", int, "width of the query latent; 0: queries straight from the input", default=0, minimum=0,
          maximum=MAX_WIDTH, width=True),
    Param("qk_nope_head_dim", int, "query/key dimensions per head without RoPE", default=128, minimum=0, maximum=MAX_WIDTH,
          positional=False),
    Param("qk_rope_head_dim", int, "query/key dimensions per head with RoPE (the key's shared by all heads)", default=64, minimum=2,
          maximum=MAX_WIDTH, positional=False),
    Param("v_head_dim", int, "value dimensions per head", default=128, minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("rope", Call, "position encoding of the RoPE dimensions: rope(...) or yarn(...)", setting="rope", kind="position",
          positional=False),
    Param("scale", float, "logit scale; 0 is 1/sqrt(qk_nope_head_dim + qk_rope_head_dim)", setting="attn_scale", minimum=0,
          positional=False),
    Param("gate", str, "sigmoid gate from the layer input: on the attention output, elementwise or head; on the queries (query); on "
                       "o_proj's output (output); or none",
          default="none", choices=MLA_GATES, positional=False),
    Param("shared_latent", bool, "queries decompressed from the key/value latent too, no query down-projection (q_lora_rank 0)",
          default=False, positional=False),
    Param("absorb", bool, "attend over the latents, the up-projections folded into query and output (as decoding does)",
          default=False, positional=False),
    Param("latent_eps", float, "epsilon of the latents' norms (Kimi-Linear keeps 1e-6 whatever its rms_norm_eps)", setting="norm_eps",
          minimum=0, positional=False),
)


def attend_widths(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention whose values may be narrower or wider than queries and keys.

    CPUs' fused SDPA takes only equal widths (otherwise it falls back to materialising T x T, ~5x slower), so off
    the meta device the narrower side is padded with zeros, which change no score and no output; the analysis
    (meta) counts the unpadded products.
    """
    extra = q.shape[-1] - v.shape[-1]
    if not extra or q.is_meta:
        return attend(q, k, v, scale=scale)
    if extra > 0:
        return attend(q, k, F.pad(v, (0, extra)), scale=scale)[..., : v.shape[-1]]
    return attend(F.pad(q, (0, -extra)), F.pad(k, (0, -extra)), v, scale=scale)


def logit_scale(scale: float, qk_head_dim: int, rope: Call) -> float:
    """The softmax scale: `scale` or 1/sqrt(qk_head_dim), with DeepSeek-V3's YaRN correction mscale(factor, mscale_all_dim)^2."""
    base = scale or qk_head_dim ** -0.5
    args = rope.kwargs()
    if rope.name == "yarn" and args["mscale_all_dim"]:
        base *= mscale(args["factor"], args["mscale_all_dim"]) ** 2
    return base


@register("mla", "mixer", *MLA_PARAMS)
class LatentAttention(Component):
    """Multi-head latent attention (DeepSeek-V2/V3): a low-rank cached latent, decompressed or absorbed."""

    hf_module = "self_attn"

    def __init__(self, config: ModelConfig, heads: int, kv_lora_rank: int, q_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, rope: Call, scale: float, gate: str, shared_latent: bool, absorb: bool,
                 latent_eps: float) -> None:
        super().__init__()
        self.n_heads, self.kv_lora_rank, self.q_lora_rank, self.shared_latent = heads, kv_lora_rank, q_lora_rank, shared_latent
        self.nope, self.rope_dim, self.v_head_dim, self.gate, self.absorb = qk_nope_head_dim, qk_rope_head_dim, v_head_dim, gate, absorb
        self.scale = logit_scale(scale, qk_nope_head_dim + qk_rope_head_dim, rope)
        d, q_width = config.d_model, heads * (qk_nope_head_dim + qk_rope_head_dim)
        if q_lora_rank:
            self.q_a_proj = nn.Linear(d, q_lora_rank, bias=False)
            self.q_a_layernorm = make_norm(dataclasses.replace(config, norm_eps=latent_eps), q_lora_rank)
            self.q_b_proj = nn.Linear(q_lora_rank, q_width, bias=False)
        elif shared_latent:  # one down-projection for queries, keys and values: q_b_proj reads the normed kv latent
            self.q_b_proj = nn.Linear(kv_lora_rank, q_width, bias=False)
        else:
            self.q_proj = nn.Linear(d, q_width, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = make_norm(dataclasses.replace(config, norm_eps=latent_eps), kv_lora_rank)
        self.kv_b_proj = nn.Linear(kv_lora_rank, heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * v_head_dim, d, bias=False)
        if gate != "none":
            self.gate_proj = nn.Linear(d, {"elementwise": heads * v_head_dim, "head": heads, "query": q_width, "output": d}[gate], bias=False)
        self.layout = REGISTRY[rope.name].module.layout(qk_rope_head_dim, **rope.kwargs())
        self.rotary = Rotary(rope, qk_rope_head_dim) if self.layout else None  # nope: the shared key dims stay unrotated (Kimi-Linear)

    @classmethod
    def check(cls, config: ModelConfig, **args: Any) -> str | None:
        for rank in ("kv_lora_rank", "q_lora_rank"):
            if args[rank] > config.d_model:
                return f"{rank} = {args[rank]} is larger than the width d_model = {config.d_model}: a latent compresses"
        if args["shared_latent"] and args["q_lora_rank"]:
            return f"shared_latent takes the queries from the key/value latent: q_lora_rank = {args['q_lora_rank']} must be 0"
        rope = args["rope"]
        return REGISTRY[rope.name].module.problem(args["qk_rope_head_dim"], **rope.kwargs())

    @classmethod
    def describe(cls, call: Call, config: ModelConfig) -> list[str]:
        args, shown = call.kwargs(), telling(call, config, always=("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
        query = f"q latent {args['q_lora_rank']}" if args["q_lora_rank"] else "q from kv latent" if args["shared_latent"] else "q from x"
        return ([shown] if shown else []) + [f"{args['heads']} heads, kv latent {args['kv_lora_rank']} + RoPE key {args['qk_rope_head_dim']}, {query}"]

    def inputs(self) -> tuple[Input, ...]:
        return (BRANCH, self.rotary) if self.rotary else (BRANCH,)

    def queries(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, kv_latent: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Each head's query without and with RoPE (B, H, T, nope), (B, H, T, rope), and the normed query latent (None without one;
        with shared_latent, the key/value latent (B, 1, T, r) `latents` made)."""
        batch, length, _ = x.shape
        latent = self.q_a_layernorm(self.q_a_proj(x)) if self.q_lora_rank else kv_latent.squeeze(1) if self.shared_latent else None
        q = self.q_b_proj(latent) if latent is not None else self.q_proj(x)
        if self.gate == "query":  # G4: the query projection's output, per channel, before RoPE (and before absorption)
            q = q * torch.sigmoid(self.gate_proj(x))
        q_nope, q_rope = q.view(batch, length, self.n_heads, self.nope + self.rope_dim).transpose(1, 2).split((self.nope, self.rope_dim), -1)
        return q_nope, rotate(q_rope, cos, sin, self.layout) if self.layout else q_rope, latent

    def latents(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache holds: the normed latent (B, 1, T, kv_lora_rank) and the rotated shared key (B, 1, T, rope)."""
        latent, k_rope = self.kv_a_proj_with_mqa(x).unsqueeze(1).split((self.kv_lora_rank, self.rope_dim), dim=-1)
        return self.kv_a_layernorm(latent), rotate(k_rope, cos, sin, self.layout) if self.layout else k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
        latent, k_rope = self.latents(x, cos, sin)
        q_nope, q_rope, _ = self.queries(x, cos, sin, latent)
        return self.output(x, (self.attend_absorbed if self.absorb else self.attend_decompressed)(q_nope, q_rope, latent, k_rope))

    def output(self, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """o_proj of the heads' outputs (B, H, T, v_head_dim), gated from the layer input x if the call says so."""
        batch, _, length, _ = heads.shape
        out = heads.transpose(1, 2).reshape(batch, length, self.n_heads * self.v_head_dim)
        if self.gate == "output":  # G5: the projected output, per model channel
            return self.o_proj(out) * torch.sigmoid(self.gate_proj(x))
        return self.o_proj(apply_gate(out, self.gate_proj(x) if self.gate in ("elementwise", "head") else None, self.n_heads))

    def up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head into the key half (H, nope, r) and the value half (H, v, r)."""
        up = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_head_dim, self.kv_lora_rank)
        return up.split((self.nope, self.v_head_dim), dim=1)

    def attend_decompressed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor
                            ) -> torch.Tensor:
        """Training form: every head's keys [k_nope | shared k_rope] and values from kv_b_proj; (B, H, T, v_head_dim)."""
        batch, _, length, _ = latent.shape
        kv = self.kv_b_proj(latent.squeeze(1)).view(batch, length, self.n_heads, self.nope + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split((self.nope, self.v_head_dim), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, self.n_heads, -1, -1)), dim=-1)
        return attend_widths(torch.cat((q_nope, q_rope), dim=-1), k, v, self.scale)

    def attend_absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Absorbed form: q_nope W_UK scores the latent itself, and W_UV maps the latent-weighted sum out; (B, H, T, v_head_dim)."""
        q = self.absorbed_queries(q_nope, q_rope)
        out = attend_widths(q, torch.cat((latent, k_rope), dim=-1), latent, self.scale)  # one key/value head for all
        return out @ self.up_projections()[1].transpose(1, 2)

    def absorbed_queries(self, q_nope: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        """Each head's query of the latent cache: [q_nope W_UK | q_rope] (B, H, T, r + rope)."""
        return torch.cat((q_nope @ self.up_projections()[0], q_rope), dim=-1)

    def state(self, batch: int, capacity: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The latent cache: per position the normed latent and the rotated shared RoPE key, side by side (B, 1, capacity, r + rope)."""
        return {"latents": torch.zeros(batch, 1, capacity, self.kv_lora_rank + self.rope_dim, device=device, dtype=dtype)}

    def cache(self, state: dict[str, torch.Tensor], start: int, latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Write the new tokens' latents and RoPE keys (`latents`) at start..; the cache up to the last of them (B, 1, end, r + rope)."""
        end = start + latent.shape[2]
        state["latents"][:, :, start:end] = torch.cat((latent, k_rope), dim=-1)
        return state["latents"][:, :, :end]

    def decode(self, state: dict[str, torch.Tensor], start: int, x: torch.Tensor, cos: torch.Tensor | None = None,
               sin: torch.Tensor | None = None) -> torch.Tensor:
        """The absorbed form over the latent cache: each head's query scores [latent | RoPE key] of every position so far."""
        latent, k_rope = self.latents(x, cos, sin)
        q_nope, q_rope, _ = self.queries(x, cos, sin, latent)
        cached = self.cache(state, start, latent, k_rope)
        length, end = x.shape[1], cached.shape[2]
        positions = torch.arange(start, end, device=x.device)
        visible = None if length == 1 else positions[:, None] >= torch.arange(end, device=x.device)[None, :]
        # the cache as value too (equal widths keep SDPA fused): the output's first kv_lora_rank channels are the latents' mix
        out = attend_visible(self.absorbed_queries(q_nope, q_rope), cached, cached, visible, self.scale, 0.0)[..., : self.kv_lora_rank]
        return self.output(x, out @ self.up_projections()[1].transpose(1, 2))

    def cache_elements(self, seq_len: int) -> int:
        return (self.kv_lora_rank + self.rope_dim) * seq_len

    def flop_handles(self, seq_len: int) -> dict[str, Callable]:
        return {"aten::scaled_dot_product_attention": sdpa_handle(seq_len * (seq_len + 1) // 2)}

    def hf_weights(self) -> dict[str, str]:
        return {name: name for name, _ in self.named_parameters()}  # transformers' DeepseekV3Attention names

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, kv_lora_rank={self.kv_lora_rank}, q_lora_rank={self.q_lora_rank}, absorb={self.absorb}"
