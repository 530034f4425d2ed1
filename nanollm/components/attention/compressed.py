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
differentiable: its weights get no gradient from the language loss (as in transformers). Decoding keeps a ring of the
window's keys, every entry, and the projections of the last windows' tokens, pooled into an entry when its window ends.
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

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What tokens at these positions (B, T, d) give the pooling: kv (B, T, projected), and the gate with its bias per
        position in the window."""
        return self.kv_proj(x), self.gate_proj(x) + self.position_bias[positions % self.rate]

    def pool(self, kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Consecutive windows (B, n, rate, projected) pooled, (B, n, width); overlapping, entry w pools window w-1's first
        halves (none for the first window given) and window w's second halves."""
        if self.overlap:
            previous = (0, 0, 0, 0, 1, 0)  # one window earlier, along the window axis
            kv = torch.cat((F.pad(kv[:, :-1, :, : self.width], previous), kv[..., self.width:]), dim=2)
            gate = torch.cat((F.pad(gate[:, :-1, :, : self.width], previous, value=float("-inf")), gate[..., self.width:]), dim=2)
        return (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)

    def finish(self, pooled: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Pooled windows (B, n, width) normed and rotated by the tables of their first positions."""
        return rotate(self.kv_norm(pooled).unsqueeze(1), cos, sin, layout).squeeze(1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout) -> torch.Tensor:
        """The entries (B, N, width) of the N = T // rate complete windows of x (B, T, d); tables of positions 0..T-1."""
        batch, length, _ = x.shape
        entries = length // self.rate
        if not entries:
            return x.new_zeros(batch, 0, self.width)
        used = entries * self.rate
        shape = (batch, entries, self.rate, self.kv_proj.out_features)
        kv, gate = self.project(x[:, :used], torch.arange(used, device=x.device))
        starts = slice(0, used, self.rate)  # entry w sits at its window's first position
        return self.finish(self.pool(kv.view(shape), gate.view(shape)), cos[starts], sin[starts], layout)

    def state(self, batch: int, capacity: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every entry of a sequence of up to `capacity` tokens, and the projections of the last tokens the next entry pools."""
        held = (2 if self.overlap else 1) * self.rate
        projections = (batch, held, self.kv_proj.out_features)
        return {"entries": torch.zeros(batch, capacity // self.rate, self.width, device=device, dtype=dtype),
                "kv": torch.zeros(projections, device=device, dtype=dtype), "gate": torch.zeros(projections, device=device, dtype=dtype)}

    def decode(self, state: dict[str, torch.Tensor], start: int, x: torch.Tensor, table: nn.Module, layout: Layout) -> torch.Tensor:
        """The entries (B, N, width) of every window ended by the last of the tokens x (B, T, d) at positions start..; the
        windows ending among them pooled from the projections `state` holds of the tokens before and theirs; `table` gives
        the rotary tables of any positions."""
        batch, length, _ = x.shape
        slots = state["kv"].shape[1]
        positions = torch.arange(start, start + length, device=x.device)
        kv, gate = self.project(x, positions)
        held = min(start, slots)
        earlier = torch.arange(start - held, start, device=x.device) % slots
        kv_all, gate_all = torch.cat((state["kv"][:, earlier], kv), dim=1), torch.cat((state["gate"][:, earlier], gate), dim=1)
        first, end = start // self.rate, (start + length) // self.rate  # the windows ending among the new tokens
        if end > first:
            lowest = first - 1 if self.overlap and first else first  # overlapping, the window before lends its first halves
            begin = lowest * self.rate - (start - held)
            shape = (batch, end - lowest, self.rate, kv.shape[-1])
            span = slice(begin, begin + (end - lowest) * self.rate)
            pooled = self.pool(kv_all[:, span].reshape(shape), gate_all[:, span].reshape(shape))[:, first - lowest:]
            cos, sin = table(torch.arange(first, end, device=x.device) * self.rate)
            state["entries"][:, first:end] = self.finish(pooled, cos, sin, layout)
        keep = min(length, slots)
        state["kv"][:, positions[-keep:] % slots] = kv[:, -keep:]
        state["gate"][:, positions[-keep:] % slots] = gate[:, -keep:]
        return state["entries"][:, :end]

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
    def choose(self, x: torch.Tensor, q_latent: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout,
               topk: int, positions: torch.Tensor) -> torch.Tensor:
        """Which of its entries keys (B, N, width) queries at these positions attend, (B, T, N) boolean: the `topk` highest
        scoring of those whose windows have ended."""
        batch, length, _ = x.shape
        q = rotate(self.q_b_proj(q_latent).view(batch, length, self.heads, self.width).transpose(1, 2), cos, sin, layout)
        ended = entries_ended(positions, keys.shape[1], self.rate)
        scores = lightning_scores(q, keys.unsqueeze(1), self.weights_proj(x)).masked_fill(~ended, float("-inf"))
        chosen = scores.topk(min(topk, keys.shape[1]), dim=-1).indices.unsqueeze(-1)  # (B, T, k, 1)
        picked = (chosen == torch.arange(keys.shape[1], device=x.device)).any(dim=-2)
        return picked & ended  # a query short of topk ended entries picks some unended ones too


def entries_ended(positions: torch.Tensor, entries: int, rate: int) -> torch.Tensor:
    """(T, N) boolean: True where the window of entry w has ended by the query's position t, (w + 1)·rate <= t + 1."""
    return torch.arange(entries, device=positions.device)[None, :] < (positions[:, None] + 1) // rate


def part(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors of a state whose keys start with `name.`, by the rest of their keys (the same tensors, updated in place)."""
    return {key[len(name) + 1:]: tensor for key, tensor in state.items() if key.startswith(f"{name}.")}


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
    Param("index_head_dim", int, "width of an indexer head and of its entries", default=128, minimum=2, maximum=MAX_WIDTH,
          positional=False),
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
        self.table = REGISTRY[rope.name].module(head_dim, **rope.kwargs())  # decoding: the tables of the entries' positions
        if self.indexer:  # the indexer's heads rotate as many dimensions, at the same end of the head
            rotated = self.layout.stop - self.layout.start
            start = index_head_dim - rotated if self.layout.stop == head_dim else 0
            self.index_layout = Layout(start, start + rotated, self.layout.interleaved)

    @classmethod
    def check(cls, config: ModelConfig, **args: Any) -> str | None:
        if args["heads"] % args["o_groups"]:
            return f"o_groups = {args['o_groups']} does not divide heads = {args['heads']}"
        rope = args["rope"]
        position = REGISTRY[rope.name].module
        layout = position.layout(args["head_dim"], **rope.kwargs())
        if layout is None:
            return "the inverse RoPE on the output needs a rotary position encoding (rope or yarn, not nope)"
        problem = position.problem(args["head_dim"], **rope.kwargs())
        if problem:
            return problem
        if args["rate"] and args["topk"] and layout.stop - layout.start > args["index_head_dim"]:
            return (f"{layout.stop - layout.start} rotated dimensions do not fit an indexer head of index_head_dim = "
                    f"{args['index_head_dim']}")
        return None

    @classmethod
    def describe(cls, call: Call, config: ModelConfig) -> list[str]:
        args, shown = call.kwargs(), telling(call, config, always=("window",))
        heads = f"{args['heads']} heads, 1 K = V head of {args['head_dim']}, sinks, out by {args['o_groups']} x {args['o_lora_rank']}"
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

    def heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The query latent (B, T, q_lora_rank), the rotated queries (B, H, T, head_dim) and the one rotated key/value head
        (B, 1, T, head_dim)."""
        batch, length, _ = x.shape
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        q = rotate(F.rms_norm(q, (self.head_dim,), eps=self.eps), cos, sin, self.layout)  # unweighted, per head
        return q_latent, q, rotate(self.kv_norm(self.kv_proj(x)).unsqueeze(1), cos, sin, self.layout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q_latent, q, kv = self.heads(x, cos, sin)
        visible = causal_mask(length, self.window, x.device).expand(batch, 1, length, length)
        if self.compressor:
            entries = self.compressor(x, cos, sin, self.layout)
            positions = torch.arange(length, device=x.device)
            if self.indexer:
                with torch.no_grad():  # detached: views made here would otherwise claim a gradient they lack
                    index_keys = self.indexer(x.detach(), cos, sin, self.index_layout)
                seen = self.indexer.choose(x.detach(), q_latent.detach(), index_keys, cos, sin, self.index_layout, self.topk, positions)
            else:
                seen = entries_ended(positions, entries.shape[1], self.rate).expand(batch, -1, -1)
            kv, visible = torch.cat((kv, entries.unsqueeze(1)), dim=2), torch.cat((visible, seen.unsqueeze(1)), dim=-1)
        return self.output(self.attend(q, kv, visible), cos, sin)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Attention of q (B, H, T, head_dim) over keys (B, 1, S, head_dim), which are the values too, where `visible` (B, 1, T, S)
        allows, with the sinks."""
        if q.is_meta:  # the analysis: a sink is no product, and SDPA's handle counts the pairs really scored
            return F.scaled_dot_product_attention(q, keys, keys, attn_mask=visible, scale=self.scale, enable_gqa=True)
        return attend_visible_with_sink(q, keys, keys, visible, self.scale, self.sinks)

    def output(self, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The heads' outputs (B, H, T, head_dim) rotated back by their query's position (the values carried RoPE), out through
        the grouped projection; (B, T, d_model)."""
        batch, _, length, _ = out.shape
        out = rotate(out, cos, -sin, self.layout).transpose(1, 2)
        return self.o_b_proj(self.grouped_output(out.reshape(batch * length, self.o_groups, -1)).reshape(batch, length, -1))

    def state(self, batch: int, capacity: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The window's keys (a ring buffer of the last `window`) and the position each slot holds (-1: empty); the entries
        and pending projections of the compressor and the indexer."""
        slots = min(capacity, self.window)
        state = {"keys": torch.zeros(batch, 1, slots, self.head_dim, device=device, dtype=dtype),
                 "positions": torch.full((slots,), -1, dtype=torch.long, device=device)}
        for name, compressor in (("compressor", self.compressor), ("indexer", self.indexer)):
            if compressor:
                state |= {f"{name}.{key}": tensor for key, tensor in compressor.state(batch, capacity, device, dtype).items()}
        return state

    def decode(self, state: dict[str, torch.Tensor], start: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q_latent, q, kv = self.heads(x, cos, sin)
        positions = torch.arange(start, start + length, device=x.device)
        keys, held = torch.cat((state["keys"], kv), dim=2), torch.cat((state["positions"], positions))
        query, key = positions[:, None], held[None, :]
        visible = ((key >= 0) & (key <= query) & (query - key < self.window)).expand(batch, 1, length, -1)
        keep = min(length, state["positions"].shape[0])  # the ring keeps the last `window`
        slots = positions[-keep:] % state["positions"].shape[0]
        state["keys"][:, :, slots], state["positions"][slots] = kv[:, :, -keep:], positions[-keep:]
        if self.compressor:
            entries = self.compressor.decode(part(state, "compressor"), start, x, self.table, self.layout)
            if self.indexer:
                with torch.no_grad():
                    index_keys = self.indexer.decode(part(state, "indexer"), start, x, self.table, self.index_layout)
                seen = self.indexer.choose(x, q_latent, index_keys, cos, sin, self.index_layout, self.topk, positions)
            else:
                seen = entries_ended(positions, entries.shape[1], self.rate).expand(batch, -1, -1)
            keys, visible = torch.cat((keys, entries.unsqueeze(1)), dim=2), torch.cat((visible, seen.unsqueeze(1)), dim=-1)
        return self.output(self.attend(q, keys, visible), cos, sin)

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
