"""Causal grouped-query attention over the whole prefix (`global`); MHA when kv_heads == heads.

Every setting that real models vary layer by layer is an argument defaulting to the model setting: head
counts and width, QK-norm (per head as Qwen3, over the whole projection as OLMo 2/3, or none), the position
encoding (Gemma 3 gives its local layers another RoPE base), the logit scale and the logit soft-cap.

The attention core runs on scaled_dot_product_attention, except with a soft-cap, which SDPA cannot apply:
then flex_attention (score_mod) on GPUs and the plain softmax(QK^T) V elsewhere. On the meta device
(the analysis) it is always SDPA: the products are the same, and SDPA's fvcore handle counts the pairs
really attended.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from fvcore.nn.jit_handles import get_shape
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .. import BRANCH, REGISTRY, Component, Input, Param, Rotary, make_norm, register, telling
from ...ir import MAX_WIDTH, QK_NORMS, Call, ModelConfig
from ..position.rope import rotate

GATES = ("none", "elementwise", "head")  # gated attention (Qiu et al. 2025): where the output's sigmoid gate acts

ATTENTION_PARAMS = (  # per-layer overrides of the model settings, by name only
    Param("heads", int, "query heads", setting="n_heads", minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("kv_heads", int, "key/value heads", setting="n_kv_heads", minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("head_dim", int, "width of one head", setting="head_dim", minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("qk_norm", str, "norm on queries and keys: head, projection or none", setting="qk_norm", choices=QK_NORMS, positional=False),
    Param("rope", Call, "position encoding: rope(...), yarn(...) or nope", setting="rope", kind="position", positional=False),
    Param("scale", float, "logit scale; 0 is 1/sqrt(head_dim)", setting="attn_scale", minimum=0, positional=False),
    Param("softcap", float, "logit soft-cap c tanh(s / c); 0 is off", setting="attn_softcap", minimum=0, positional=False),
    Param("gate", str, "sigmoid gate on the output from the layer input: none, elementwise (per channel, Qwen3-Next) or head "
                       "(one per head)", default="none", choices=GATES, positional=False),
)


def sdpa_handle(attended_pairs: int) -> Callable:
    """fvcore handle for scaled_dot_product_attention counting only the (query, key) pairs really attended."""

    def count(inputs: list, outputs: list) -> int:
        q, v = get_shape(inputs[0]), get_shape(inputs[2])
        batch, heads = q[0], q[1]
        return batch * heads * attended_pairs * (q[-1] + v[-1])  # QK^T and AV multiply-accumulates

    return count


def apply_gate(out: torch.Tensor, gate: torch.Tensor | None, heads: int) -> torch.Tensor:
    """The attention output (B, T, heads * d) times sigmoid(gate): gate (B, T, heads * d) per channel, or (B, T, heads) per head."""
    if gate is None:
        return out
    if gate.shape[-1] == heads:
        return (out.unflatten(-1, (heads, -1)) * torch.sigmoid(gate).unsqueeze(-1)).flatten(-2)
    return out * torch.sigmoid(gate)


def causal_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean (T, T) mask, True where query q may attend key k: k <= q, and q - k < window if given."""
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    return (k <= q) & (q - k < window) if window else k <= q


@functools.lru_cache(maxsize=8)
def block_mask(length: int, window: int | None, device: torch.device) -> BlockMask:
    """flex_attention block mask of the causal (windowed) pattern; blocks wholly outside it are skipped."""

    def visible(b, h, q, k):
        return (k <= q) & (q - k < window) if window else k <= q

    return create_block_mask(visible, None, None, length, length, device=device)


def attend_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float | None, softcap: float
                ) -> torch.Tensor:
    """Block-sparse path: flex_attention, the soft-cap as a score modification."""

    def capped(score, b, h, q_idx, k_idx):
        return softcap * torch.tanh(score / softcap)

    return flex_attention(q, k, v, score_mod=capped if softcap else None, block_mask=block_mask(q.shape[-2], window, q.device),
                          scale=scale, enable_gqa=True)


def attend_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float | None, softcap: float
                 ) -> torch.Tensor:
    """softmax(cap(QK^T scale) + mask) V written out (soft-capped logits on CPUs); the softmax in fp32."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~causal_mask(q.shape[-2], window, q.device), float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v


def attend_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float | None, softcap: float
                  ) -> torch.Tensor:
    """The path everywhere but on GPUs: SDPA with an explicit boolean mask, or, soft-capped, the softmax written out."""
    if softcap:
        return attend_eager(q, k, v, window, scale, softcap)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q.shape[-2], window, q.device), scale=scale, enable_gqa=True)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None, scale: float | None = None,
           softcap: float = 0.0) -> torch.Tensor:
    """Causal attention of q (B, H, T, d) over k, v (B, H_kv, T, d), within the last `window` keys if given."""
    if q.is_cuda and (window or softcap):
        return attend_flex(q, k, v, window, scale, softcap)
    if q.is_meta:  # the analysis: the soft-cap changes no product, and SDPA's handle counts the attended pairs
        softcap = 0.0
    if window or softcap:  # flex_attention has no backward on CPU in this torch
        return attend_masked(q, k, v, window, scale, softcap)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


@register("global", "mixer", *ATTENTION_PARAMS)
class CausalAttention(Component):
    """Causal GQA with QK-norm and RoPE on scaled_dot_product_attention."""

    hf_module = "self_attn"
    window: int | None = None

    def __init__(self, config: ModelConfig, heads: int, kv_heads: int, head_dim: int, qk_norm: str, rope: Call, scale: float,
                 softcap: float, gate: str) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.qk_norm = heads, kv_heads, head_dim, qk_norm
        self.scale, self.softcap, self.gate = scale or None, softcap, gate
        d, q_width, kv_width = config.d_model, heads * head_dim, kv_heads * head_dim
        # Qwen3-Next widens q_proj to carry the elementwise gate: per head [query | gate], so its weights load unchanged.
        self.q_proj = nn.Linear(d, q_width * (2 if gate == "elementwise" else 1), bias=False)
        if gate == "head":
            self.gate_proj = nn.Linear(d, heads, bias=False)
        self.k_proj = nn.Linear(d, kv_width, bias=False)
        self.v_proj = nn.Linear(d, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, d, bias=False)
        if qk_norm != "none":
            self.q_norm = make_norm(config, head_dim if qk_norm == "head" else q_width)
            self.k_norm = make_norm(config, head_dim if qk_norm == "head" else kv_width)
        self.layout = REGISTRY[rope.name].module.layout(head_dim, **rope.kwargs())
        self.rotary = Rotary(rope, head_dim) if self.layout else None

    @classmethod
    def check(cls, config: ModelConfig, **args: Any) -> str | None:
        if args["heads"] % args["kv_heads"]:
            return f"kv_heads = {args['kv_heads']} does not divide heads = {args['heads']}"
        rope = args["rope"]
        return REGISTRY[rope.name].module.problem(args["head_dim"], **rope.kwargs())

    @classmethod
    def describe(cls, call: Call, config: ModelConfig) -> list[str]:
        args, shown = call.kwargs(), telling(call, config)
        return ([shown] if shown else []) + [f"{args['heads']} heads, {args['kv_heads']} KV, head_dim {args['head_dim']}"]

    def inputs(self) -> tuple[Input, ...]:
        return (BRANCH, self.rotary) if self.rotary else (BRANCH,)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        gate = self.gate_proj(x) if self.gate == "head" else None
        if self.gate == "elementwise":
            q, gate = q.view(batch, length, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
            q, gate = q.flatten(2), gate.flatten(2)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, length, self.n_heads, self.head_dim)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary:
            q, k = rotate(q, cos, sin, self.layout), rotate(k, cos, sin, self.layout)
        out = attend(q, k, v, self.window, self.scale, self.softcap)
        out = out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        return self.o_proj(apply_gate(out, gate, self.n_heads))

    def attended_pairs(self, seq_len: int) -> int:
        """(query, key) pairs one head scores over a sequence: each position sees itself and all before it."""
        return seq_len * (seq_len + 1) // 2

    def cache_elements(self, seq_len: int) -> int:
        return 2 * self.n_kv_heads * self.head_dim * seq_len

    def flop_handles(self, seq_len: int) -> dict[str, Callable]:
        return {"aten::scaled_dot_product_attention": sdpa_handle(self.attended_pairs(seq_len))}

    def hf_weights(self) -> dict[str, str]:
        return {name: name for name, _ in self.named_parameters()}  # transformers' names: q_proj ... o_proj, q_norm, k_norm

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}"
