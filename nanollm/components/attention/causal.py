"""Causal grouped-query attention over the whole prefix (`global`); MHA when kv_heads == heads.

Every setting that real models vary layer by layer is an argument defaulting to the model setting: head
counts and width, QK-norm (per head as Qwen3, over the whole projection as OLMo 2/3, or none), the position
encoding (Gemma 3 gives its local layers another RoPE base), the logit scale and the logit soft-cap.

Optional (GPT-OSS): biases on the four projections, and attention sinks, a learned logit per head that joins
every query's softmax and takes probability mass without bringing a value.

The attention core runs on scaled_dot_product_attention, except with a soft-cap, which SDPA cannot apply:
then flex_attention (score_mod) on GPUs and the plain softmax(QK^T) V elsewhere. Sinks run on SDPA too, as
one extra key every query sees (`with_sink`), and on GPUs as flex_attention's output rescaled by its
log-sum-exp. On the meta device (the analysis) it is always plain SDPA: soft-caps and sinks change no
product (a sink is one logit per query, not a score matmul), and SDPA's fvcore handle counts the pairs
really attended.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

from .. import BRANCH, REGISTRY, VECTOR, Component, Input, Param, Rotary, make_norm, register, telling, traced_shape
from ...ir import MAX_WIDTH, QK_NORMS, Call, ModelConfig
from ..position.rope import rotate

GATES = ("none", "elementwise", "head")  # gated attention (Qiu et al. 2025): where the output's sigmoid gate acts
# the paper's cheap other positions, on attention with its own projections: on the output of the value (G2), key (G3) or query
# (G4) projection, per channel, and on the output projection's (G5, per model channel)
PROJECTION_GATES = ("value", "key", "query")
ATTENTION_GATES = (*GATES, *PROJECTION_GATES, "output")

ATTENTION_PARAMS = (  # per-layer overrides of the model settings, by name only
    Param("heads", int, "query heads", setting="n_heads", minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("kv_heads", int, "key/value heads", setting="n_kv_heads", minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("head_dim", int, "width of one head", setting="head_dim", minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("qk_norm", str, "norm on queries and keys: head, projection or none", setting="qk_norm", choices=QK_NORMS, positional=False),
    Param("rope", Call, "position encoding: rope(...), yarn(...) or nope", setting="rope", kind="position", positional=False),
    Param("scale", float, "logit scale; 0 is 1/sqrt(head_dim)", setting="attn_scale", minimum=0, positional=False),
    Param("softcap", float, "logit soft-cap c tanh(s / c); 0 is off", setting="attn_softcap", minimum=0, positional=False),
    Param("bias", bool, "biases on the q, k, v and o projections (GPT-OSS)", default=False, positional=False),
    Param("gate", str, "sigmoid gate from the layer input: on the attention output, elementwise (per channel, Qwen3-Next) or head "
                       "(one per head); on the values (value), keys (key) or queries (query), per channel of the projection; on "
                       "o_proj's output (output); or none", default="none",
          choices=ATTENTION_GATES, positional=False),
)
SINKS = Param("sinks", bool, "a learned per-head logit in every softmax, taking mass without a value (GPT-OSS)", default=False,
              positional=False)
SINK_PAD = 16  # head widths grow by a multiple of this for the sink's extra dimension: CPU SDPA runs 65 wide 3x slower than 80


def sdpa_handle(attended_pairs: int) -> Callable:
    """fvcore handle for scaled_dot_product_attention counting only the (query, key) pairs really attended."""

    def count(inputs: list, outputs: list) -> int:
        q, v = traced_shape(inputs[0]), traced_shape(inputs[2])
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


def attend_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float | None, softcap: float,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Block-sparse path: flex_attention, the soft-cap as a score modification; sinks from its log-sum-exp.

    With a sink logit s per head, softmax over the keys and s gives each key exp(score) / (Z + exp(s)): the
    output without the sink times Z / (Z + exp(s)) = sigmoid(logsumexp - s).
    """

    def capped(score, b, h, q_idx, k_idx):
        return softcap * torch.tanh(score / softcap)

    out = flex_attention(q, k, v, score_mod=capped if softcap else None, block_mask=block_mask(q.shape[-2], window, q.device),
                         scale=scale, enable_gqa=True, return_aux=AuxRequest(lse=True) if sinks is not None else None)
    if sinks is None:
        return out
    out, aux = out
    return out * torch.sigmoid(aux.lse - sinks.view(-1, 1)).unsqueeze(-1).to(out.dtype)


def attend_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float | None, softcap: float,
                 sinks: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(cap(QK^T scale) + mask, with the sink logits as one more column, dropped after) V written out, where the
    boolean (Tq, Tk) `visible` allows; the softmax in fp32."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1).to(scores.dtype)], dim=-1)
    probabilities = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return (probabilities[..., :-1] if sinks is not None else probabilities) @ v


def with_sink(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, T, d) grown so that plain causal attention over them is attention with sinks: position 0 is a
    key every query sees, scoring sinks[h] for a query of head h and carrying a zero value; a dummy query in front
    keeps every real query's causal prefix, itself included. The score rides on an extra dimension: queries hold
    sinks / scale there, the sink key 1, the real keys 0."""
    batch, heads, length, width = q.shape
    extra = -(-(width + 1) // SINK_PAD) * SINK_PAD - width
    logit = (sinks / scale).to(q.dtype).view(1, heads, 1, 1).expand(batch, heads, length, 1)
    q = F.pad(torch.cat([q, logit], dim=-1), (0, extra - 1, 1, 0))
    sink_key = F.one_hot(torch.tensor(width, device=k.device), width + extra).to(k.dtype).expand(batch, k.shape[1], 1, -1)
    k = torch.cat([sink_key, F.pad(k, (0, extra))], dim=-2)
    return q, k, F.pad(v, (0, extra, 1, 0))


def attend_with_sink(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float | None, sinks: torch.Tensor
                     ) -> torch.Tensor:
    """Sinks on SDPA (`with_sink`): exact, within about 10% of plain causal attention on CPUs, trains everywhere."""
    length, width = q.shape[-2:]
    if window:
        return attend_visible_with_sink(q, k, v, causal_mask(length, window, q.device), scale, sinks)
    scale = scale if scale is not None else width ** -0.5
    q, k, v = with_sink(q, k, v, sinks, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)[..., 1:, :width]


def attend_visible_with_sink(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float | None,
                             sinks: torch.Tensor) -> torch.Tensor:
    """Sinks on SDPA (`with_sink`) where the boolean `visible` (Tq, Tk), or (B, 1, Tq, Tk), allows: any pattern of keys."""
    width = q.shape[-1]
    scale = scale if scale is not None else width ** -0.5
    q, k, v = with_sink(q, k, v, sinks, scale)
    mask = F.pad(visible, (1, 0, 1, 0), value=True)  # every query sees the sink
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)[..., 1:, :width]


def attend_visible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None, scale: float | None,
                   softcap: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q over k, v where the boolean (Tq, Tk) `visible` allows (None: everywhere), as decoding runs it:
    SDPA, or, soft-capped or with sinks, the softmax written out."""
    if softcap or sinks is not None:
        everywhere = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
        return attend_eager(q, k, v, everywhere if visible is None else visible, scale, softcap, sinks)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)


def attend_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float | None, softcap: float,
                  sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The path everywhere but on GPUs: SDPA with an explicit boolean mask (and sinks as an extra key), or,
    soft-capped, the softmax written out."""
    if softcap:
        return attend_eager(q, k, v, causal_mask(q.shape[-2], window, q.device), scale, softcap, sinks)
    if sinks is not None:
        return attend_with_sink(q, k, v, window, scale, sinks)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q.shape[-2], window, q.device), scale=scale, enable_gqa=True)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None, scale: float | None = None,
           softcap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q (B, H, T, d) over k, v (B, H_kv, T, d), within the last `window` keys if given, with
    a sink logit per head (H,) if given."""
    if q.is_cuda and (window or softcap or sinks is not None):
        return attend_flex(q, k, v, window, scale, softcap, sinks)
    if q.is_meta:  # the analysis: soft-caps and sinks change no product, and SDPA's handle counts the attended pairs
        softcap, sinks = 0.0, None
    if window or softcap or sinks is not None:  # flex_attention has no backward on CPU in this torch
        return attend_masked(q, k, v, window, scale, softcap, sinks)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def store(state: dict[str, torch.Tensor], positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write keys and values (B, H_kv, T, d) of `positions` into a cache's slots (position mod its length)."""
    slots = positions % state["positions"].shape[0]
    state["keys"][:, :, slots] = k
    state["values"][:, :, slots] = v
    state["positions"][slots] = positions


@register("global", "mixer", *ATTENTION_PARAMS, SINKS)
class CausalAttention(Component):
    """Causal GQA with QK-norm and RoPE on scaled_dot_product_attention."""

    hf_module = "self_attn"
    window: int | None = None

    def __init__(self, config: ModelConfig, heads: int, kv_heads: int, head_dim: int, qk_norm: str, rope: Call, scale: float,
                 softcap: float, bias: bool, gate: str, sinks: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.qk_norm = heads, kv_heads, head_dim, qk_norm
        self.scale, self.softcap, self.gate = scale or None, softcap, gate
        d, q_width, kv_width = config.d_model, heads * head_dim, kv_heads * head_dim
        # Qwen3-Next widens q_proj to carry the elementwise gate: per head [query | gate], so its weights load unchanged.
        self.q_proj = nn.Linear(d, q_width * (2 if gate == "elementwise" else 1), bias=bias)
        if gate not in ("none", "elementwise"):
            widths = {"head": heads, "value": kv_width, "key": kv_width, "query": q_width, "output": d}
            self.gate_proj = nn.Linear(d, widths[gate], bias=False)
        self.k_proj = nn.Linear(d, kv_width, bias=bias)
        self.v_proj = nn.Linear(d, kv_width, bias=bias)
        self.o_proj = nn.Linear(q_width, d, bias=bias)
        self.sinks = nn.Parameter(torch.zeros(heads)) if sinks else None
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
        q, k, v, gate = self.heads(x, cos, sin)
        return self.merge(self.attend(q, k, v), gate)

    def heads(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Queries (B, H, T, d), keys and values (B, H_kv, T, d), normed and rotated (one of them gated if gate=query, key or
        value), and the output gate's logits (or None)."""
        batch, length, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        gate = self.gate_proj(x) if self.gate in ("head", "output") else None
        if self.gate in PROJECTION_GATES:  # G2-G4: the projection's output, per channel, before QK-norm and RoPE (the cache holds it so)
            projected = {"query": q, "key": k, "value": v}
            projected[self.gate] = projected[self.gate] * torch.sigmoid(self.gate_proj(x))
            q, k, v = projected["query"], projected["key"], projected["value"]
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
        return q, k, v, gate

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention core on rotated heads q (B, H, T, d), k, v (B, H_kv, T, d)."""
        return attend(q, k, v, self.window, self.scale, self.softcap, self.sinks)

    def reset_parameters(self) -> None:
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)  # a sink logit of 0: each query's softmax starts with one key's worth of mass on the sink

    def param_roles(self) -> dict[str, str]:
        return {"sinks": VECTOR} if self.sinks is not None else {}

    def merge(self, out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """The output projection of the heads' outputs (B, H, T, d), gated before it (elementwise, head) or after it (output)."""
        batch, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        if self.gate == "output":  # G5: the projected output, per model channel
            return self.o_proj(out) * torch.sigmoid(gate)
        return self.o_proj(apply_gate(out, gate, self.n_heads))

    def state(self, batch: int, capacity: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Keys and values of every position (a sliding window's: a ring buffer of its last `window`), and the
        position each slot holds (-1: empty)."""
        slots = min(capacity, self.window) if self.window else capacity
        shape = (batch, self.n_kv_heads, slots, self.head_dim)
        return {"keys": torch.zeros(shape, device=device, dtype=dtype), "values": torch.zeros(shape, device=device, dtype=dtype),
                "positions": torch.full((slots,), -1, dtype=torch.long, device=device)}

    def decode(self, state: dict[str, torch.Tensor], start: int, x: torch.Tensor, cos: torch.Tensor | None = None,
               sin: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v, gate = self.heads(x, cos, sin)
        length, slots = x.shape[1], state["positions"].shape[0]
        positions = torch.arange(start, start + length, device=x.device)
        if self.window is None:  # a slot per position: attend over the filled prefix, no mask for one token
            store(state, positions, k, v)
            end = start + length
            visible = None if length == 1 else positions[:, None] >= torch.arange(end, device=x.device)[None, :]
            return self.merge(attend_visible(q, state["keys"][:, :, :end], state["values"][:, :, :end], visible, self.scale, self.softcap,
                                             self.sinks), gate)
        if length == 1:  # written first: the new key overwrites only the position that has just left the window
            store(state, positions, k, v)
            context_k, context_v, held = state["keys"], state["values"], state["positions"]
        else:  # a chunk attends over the ring as it was and its own keys; the ring then keeps the last `window`
            context_k, context_v = torch.cat((state["keys"], k), dim=2), torch.cat((state["values"], v), dim=2)
            held = torch.cat((state["positions"], positions))
            keep = min(length, slots)
            store(state, positions[-keep:], k[:, :, -keep:], v[:, :, -keep:])
        query, key = positions[:, None], held[None, :]
        visible = (key >= 0) & (key <= query) & (query - key < self.window)
        return self.merge(attend_visible(q, context_k, context_v, visible, self.scale, self.softcap, self.sinks), gate)

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
        sinks = ", sinks" if self.sinks is not None else ""
        return f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}{sinks}"
