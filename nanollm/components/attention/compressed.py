"""Compressed attention (`compressed`, DeepSeek-V4): a sliding window of shared keys/values, plus one pooled entry for every
`rate` tokens of the whole prefix, all under one softmax.

The window part: queries through a normed low-rank latent (q_a -> norm -> q_b), then an unweighted RMSNorm per head;
one key/value head (multi-query) that is both key and value (K = V: kv_proj -> norm); RoPE on part of each head; a
learned sink logit per head; each query sees the last `window` tokens, itself included. As K = V, the values carry
RoPE too: the output's rotated dimensions are rotated back by the query's own position (inverse RoPE), so what each
key contributes depends on its distance only. The heads' outputs go out through a grouped low-rank projection:
`o_groups` groups of heads, each projected to `o_lora_rank` (o_a, block-diagonal), then mixed to d_model (o_b).

The compressed part (`rate` > 0): entry w pools tokens w·rate .. (w+1)·rate - 1 by a softmax over the tokens of a
gate (gate_proj + a learned bias per position in the window) weighting kv_proj, per channel; normed, and rotated at
position w·rate. With `overlap` (CSA), both projections are twice as wide and entry w pools 2·rate tokens: the first
halves of window w-1 and the second halves of window w. A query at position t sees the entries whose windows have
ended, w < (t + 1) // rate: every one of them (HCA), or the `topk` of them an indexer scores highest (CSA). The
indexer is the lightning indexer's score (dsa.py) over entries of its own narrower compressor, its queries from the
query latent. Compressed entries use the layer's position encoding (DeepSeek-V4 gives these layers YaRN at another
base), looked up at the window starts.

The pairs scored are those of the window and the visible entries, counted so in the analysis (SDPA's handle); the
indexer's scoring is a matmul over all (query, entry) pairs, counted at its shape. The indexer's choice is not
differentiable: its weights get no gradient from the language loss (as in transformers).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import BRANCH, REGISTRY, VECTOR, Component, Input, Param, Rotary, make_norm, register, telling
from ...ir import MAX_WIDTH, Call, ModelConfig
from ..position.rope import Layout, rotate
from .causal import attend_visible_with_sink, causal_mask, sdpa_handle
from .dsa import lightning_scores


class Compressor(nn.Module):
    """One entry per `rate` tokens: softmax-gated pooling of a projection, normed and rotated (transformers' names)."""

    def __init__(self, config: ModelConfig, width: int, rate: int, overlap: bool) -> None:
        super().__init__()
        self.width, self.rate, self.overlap = width, rate, overlap
        projected = 2 * width if overlap else width  # overlapping: [first half, for the next entry | second half, for this one]
        self.kv_proj = nn.Linear(config.d_model, projected, bias=False)
        self.gate_proj = nn.Linear(config.d_model, projected, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, projected))
        self.kv_norm = make_norm(config, width)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.position_bias)

    def param_roles(self) -> dict[str, str]:
        return {"position_bias": VECTOR}

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout) -> torch.Tensor:
        """The entries (B, N, width) of the N = T // rate complete windows of x (B, T, d); tables of positions 0..T-1."""
        batch, length, _ = x.shape
        entries = length // self.rate
        if not entries:
            return x.new_zeros(batch, 0, self.width)
        used = x[:, : entries * self.rate]
        shape = (batch, entries, self.rate, self.kv_proj.out_features)
        kv, gate = self.kv_proj(used).view(shape), self.gate_proj(used).view(shape) + self.position_bias
        if self.overlap:  # entry w: window w-1's first halves (none before window 0), then window w's second halves
            previous = (0, 0, 0, 0, 1, 0)  # one window earlier, along the window axis
            kv = torch.cat((F.pad(kv[:, :-1, :, : self.width], previous), kv[..., self.width:]), dim=2)
            gate = torch.cat((F.pad(gate[:, :-1, :, : self.width], previous, value=float("-inf")), gate[..., self.width:]), dim=2)
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)
        starts = slice(0, entries * self.rate, self.rate)  # entry w sits at its window's first position
        return rotate(self.kv_norm(pooled).unsqueeze(1), cos[starts], sin[starts], layout).squeeze(1)

    def state_elements(self, seq_len: int) -> int:
        """What decoding on must keep besides the entries: the projections of the tokens of the open window, and, overlapping,
        the first halves of the last closed window (the next entry pools them)."""
        open_tokens = seq_len % self.rate
        carried = self.rate * self.width if self.overlap and seq_len >= self.rate else 0
        return 2 * (open_tokens * self.kv_proj.out_features + carried)  # kv and gate


class CompressedIndexer(Compressor):
    """DeepSeek-V4's indexer: its own compressor's entries scored by the lightning indexer's equation for each query."""

    def __init__(self, config: ModelConfig, q_lora_rank: int, heads: int, width: int, rate: int, overlap: bool) -> None:
        super().__init__(config, width, rate, overlap)
        self.heads = heads
        self.q_b_proj = nn.Linear(q_lora_rank, heads * width, bias=False)
        self.weights_proj = nn.Linear(config.d_model, heads, bias=False)

    @torch.no_grad()
    def choose(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout, topk: int
               ) -> torch.Tensor:
        """Which entries each query attends, (B, T, N) boolean: the `topk` highest scoring of those whose windows have ended."""
        batch, length, _ = x.shape
        x, q_latent = x.detach(), q_latent.detach()  # views of them made here would otherwise claim a gradient they lack
        keys = self.forward(x, cos, sin, layout).unsqueeze(1)  # (B, 1, N, width)
        q = rotate(self.q_b_proj(q_latent).view(batch, length, self.heads, self.width).transpose(1, 2), cos, sin, layout)
        ended = entries_ended(length, self.rate, x.device)
        scores = lightning_scores(q, keys, self.weights_proj(x)).masked_fill(~ended, float("-inf"))
        chosen = scores.topk(min(topk, keys.shape[2]), dim=-1).indices.unsqueeze(-1)  # (B, T, k, 1)
        picked = (chosen == torch.arange(keys.shape[2], device=x.device)).any(dim=-2)
        return picked & ended  # a query short of topk ended entries picks some unended ones too


def entries_ended(length: int, rate: int, device: torch.device) -> torch.Tensor:
    """(T, N) boolean: True where the window of entry w has ended by position t, (w + 1)·rate <= t + 1."""
    positions = torch.arange(length, device=device)
    return torch.arange(length // rate, device=device)[None, :] < (positions[:, None] + 1) // rate


def visible_entries(length: int, rate: int, topk: int) -> int:
    """(query, entry) pairs attended over a sequence: each position's ended entries, at most `topk` if topk > 0."""
    ended = [(t + 1) // rate for t in range(length)] if rate else [0] * length
    return sum(min(n, topk) if topk else n for n in ended)


@register(
    "compressed",
    "mixer",
    Param("window", int, "keys each query attends in its window, itself included", default=128, minimum=1, maximum=1 << 30, carry=True),
    Param("rate", int, "tokens pooled into one compressed entry; 0: the window alone", default=4, minimum=0, maximum=1 << 30),
    Param("overlap", bool, "entries pool 2·rate tokens, overlapping by rate (CSA)", default=True),
    Param("topk", int, "compressed entries each query attends, chosen by the indexer; 0: every ended one, no indexer (HCA)",
          default=512, minimum=0, maximum=1 << 30),
    Param("index_heads", int, "indexer heads", default=64, minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("index_head_dim", int, "width of an indexer head and of its entries", default=128, minimum=2, maximum=MAX_WIDTH, positional=False),
    Param("heads", int, "query heads", setting="n_heads", minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("head_dim", int, "width of a head and of the one key/value head", setting="head_dim", minimum=2, maximum=MAX_WIDTH,
          positional=False),
    Param("q_lora_rank", int, "width of the query latent", default=1024, minimum=1, maximum=MAX_WIDTH, width=True),
    Param("o_groups", int, "head groups of the grouped output projection", default=8, minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("o_lora_rank", int, "width each head group is projected to before the mixing o_b", default=1024, minimum=1, maximum=MAX_WIDTH,
          width=True),
    Param("rope", Call, "position encoding: rope(...) or yarn(...)", setting="rope", kind="position", positional=False),
    Param("scale", float, "logit scale; 0 is 1/sqrt(head_dim)", setting="attn_scale", minimum=0, positional=False),
)
class CompressedAttention(Component):
    """DeepSeek-V4 attention: a window of one K = V head with sinks, plus pooled entries of the whole prefix (CSA/HCA)."""

    hf_module = "self_attn"

    def __init__(self, config: ModelConfig, window: int, rate: int, overlap: bool, topk: int, index_heads: int, index_head_dim: int,
                 heads: int, head_dim: int, q_lora_rank: int, o_groups: int, o_lora_rank: int, rope: Call, scale: float) -> None:
        super().__init__()
        self.window, self.rate, self.topk, self.n_heads, self.head_dim, self.o_groups = window, rate, topk, heads, head_dim, o_groups
        self.scale, self.eps = scale or head_dim ** -0.5, config.norm_eps
        d = config.d_model
        self.q_a_proj = nn.Linear(d, q_lora_rank, bias=False)
        self.q_a_norm = make_norm(config, q_lora_rank)
        self.q_b_proj = nn.Linear(q_lora_rank, heads * head_dim, bias=False)
        self.kv_proj = nn.Linear(d, head_dim, bias=False)
        self.kv_norm = make_norm(config, head_dim)
        self.o_a_proj = nn.Linear(heads * head_dim // o_groups, o_groups * o_lora_rank, bias=False)  # o_groups blocks, stacked
        self.o_b_proj = nn.Linear(o_groups * o_lora_rank, d, bias=False)
        self.sinks = nn.Parameter(torch.zeros(heads))
        self.compressor = Compressor(config, head_dim, rate, overlap) if rate else None
        self.indexer = CompressedIndexer(config, q_lora_rank, index_heads, index_head_dim, rate, overlap) if rate and topk else None
        self.layout = REGISTRY[rope.name].module.layout(head_dim, **rope.kwargs())
        self.rotary = Rotary(rope, head_dim)
        if self.indexer:  # the indexer's heads rotate as many dimensions, at the same end of the head
            rotated = self.layout.stop - self.layout.start
            start = index_head_dim - rotated if self.layout.stop == head_dim else 0
            self.index_layout = Layout(start, start + rotated, self.layout.interleaved)

    @classmethod
    def check(cls, config: ModelConfig, **args: Any) -> str | None:
        if args["heads"] % args["o_groups"]:
            return f"o_groups = {args['o_groups']} does not divide heads = {args['heads']}"
        rope = args["rope"]
        if REGISTRY[rope.name].module.layout(args["head_dim"], **rope.kwargs()) is None:
            return "the inverse RoPE on the output needs a rotary position encoding (rope or yarn, not nope)"
        problem = REGISTRY[rope.name].module.problem(args["head_dim"], **rope.kwargs())
        if problem:
            return problem
        layout = REGISTRY[rope.name].module.layout(args["head_dim"], **rope.kwargs())
        if args["rate"] and args["topk"] and layout.stop - layout.start > args["index_head_dim"]:
            return (f"{layout.stop - layout.start} rotated dimensions do not fit an indexer head of index_head_dim = "
                    f"{args['index_head_dim']}")
        return None

    @classmethod
    def describe(cls, call: Call, config: ModelConfig) -> list[str]:
        args, shown = call.kwargs(), telling(call, config, always=("window",))
        heads = f"{args['heads']} heads, 1 K = V head of {args['head_dim']}, sinks, out by {args['o_groups']} groups x {args['o_lora_rank']}"
        lines = ([shown] if shown else []) + [heads]
        if args["rate"]:
            pooled = f"2 x {args['rate']} tokens, stride {args['rate']}" if args["overlap"] else f"every {args['rate']} tokens"
            chosen = (f"top {args['topk']} by {args['index_heads']} x {args['index_head_dim']} indexer" if args["topk"]
                      else "all ended ones")
            lines.append(f"+ entries pooling {pooled}: {chosen}")
        return lines

    def inputs(self) -> tuple[Input, ...]:
        return (BRANCH, self.rotary)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sinks)  # as transformers: each softmax starts with one key's worth of mass on the sink

    def param_roles(self) -> dict[str, str]:
        return {"sinks": VECTOR}

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        q = rotate(F.rms_norm(q, (self.head_dim,), eps=self.eps), cos, sin, self.layout)  # unweighted, per head
        kv = rotate(self.kv_norm(self.kv_proj(x)).unsqueeze(1), cos, sin, self.layout)  # (B, 1, T, head_dim): key and value
        visible = causal_mask(length, self.window, x.device).expand(batch, 1, length, length)
        if self.compressor:
            kv = torch.cat((kv, self.compressor(x, cos, sin, self.layout).unsqueeze(1)), dim=2)
            if self.indexer:
                seen = self.indexer.choose(x, q_latent, cos, sin, self.index_layout, self.topk)
            else:
                seen = entries_ended(length, self.rate, x.device).expand(batch, -1, -1)
            visible = torch.cat((visible, seen.unsqueeze(1)), dim=-1)
        if x.is_meta:  # the analysis: a sink is no product, and SDPA's handle counts the pairs really scored
            out = F.scaled_dot_product_attention(q, kv, kv, attn_mask=visible, scale=self.scale, enable_gqa=True)
        else:
            out = attend_visible_with_sink(q, kv, kv, visible, self.scale, self.sinks)
        out = rotate(out, cos, -sin, self.layout).transpose(1, 2)  # values carried RoPE: rotated back by the query's position
        return self.o_b_proj(self.grouped_output(out.reshape(batch * length, self.o_groups, -1)).reshape(batch, length, -1))

    def grouped_output(self, groups: torch.Tensor) -> torch.Tensor:
        """o_a_proj block-diagonally: each head group of (B·T, g, heads·head_dim/g) by its own block of rows; (B·T, g, o_lora_rank)."""
        blocks = self.o_a_proj.weight.view(self.o_groups, -1, groups.shape[-1])  # (g, o_lora_rank, in)
        return (groups.transpose(0, 1) @ blocks.transpose(1, 2)).transpose(0, 1)

    def attended_pairs(self, seq_len: int) -> int:
        """(query, key) pairs one head scores: its window's keys and the compressed entries it sees."""
        full = min(self.window, seq_len)
        window = full * (full + 1) // 2 + (seq_len - full) * self.window
        return window + visible_entries(seq_len, self.rate, self.topk)

    def cache_elements(self, seq_len: int) -> int:
        elements = self.head_dim * min(self.window, seq_len)  # one head, key and value the same
        for compressor in (self.compressor, self.indexer):
            if compressor:
                elements += compressor.width * (seq_len // self.rate) + compressor.state_elements(seq_len)
        return elements

    def flop_handles(self, seq_len: int) -> dict[str, Callable]:
        return {"aten::scaled_dot_product_attention": sdpa_handle(self.attended_pairs(seq_len))}

    def hf_weights(self) -> dict[str, str]:
        # transformers' DeepseekV4Attention names; its indexer sits in its compressor, the score weights in a scorer
        renamed = {"indexer.weights_proj.": "compressor.indexer.scorer.weights_proj.", "indexer.": "compressor.indexer."}
        names = {}
        for name, _ in self.named_parameters():
            prefix = next((ours for ours in renamed if name.startswith(ours)), None)
            names[name] = renamed[prefix] + name[len(prefix):] if prefix else name
        return names

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, head_dim={self.head_dim}, window={self.window}, rate={self.rate}, topk={self.topk}"
