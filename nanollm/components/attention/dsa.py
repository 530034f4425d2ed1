"""DeepSeek sparse attention (`dsa`, DeepSeek-V3.2): MLA where each query attends only the `topk` keys a lightning
indexer picks.

The indexer has its own small heads: queries from MLA's query latent (`wq_b`), one key per token from the input
(`wk`, LayerNorm'd, cached beside the latent), RoPE on the first qk_rope_head_dim channels of each (half-split
pairs, whatever MLA's own layout). A query's score of key t is sum_h w_h relu(q_h . k_t / sqrt(d)), the weights
w = weights_proj(x) / sqrt(heads); causal keys only. The scoring is a full T x T product (counted so); it is not
differentiable through the choice, so the indexer gets no gradient from the language loss (transformers likewise;
DeepSeek's separate KL loss for it is not implemented).

Attention then runs in MLA's absorbed form over the chosen keys only: their latents and RoPE keys are gathered
(B, T, topk, ...) and every head scores those, so attention costs T x topk, not T^2 (counted so: the products are
matmuls over the gathered keys). A query with fewer than `topk` earlier keys sees all of them.

Decoding keeps MLA's latent cache and the indexer's key of every position (`cache_elements` counts both): each new
query scores every cached index key and attends the top-k positions, as forward chooses them (equal scores to the
earlier position, in both).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .. import Param, register
from ...ir import MAX_WIDTH, Call, ModelConfig
from ..position.rope import Layout, rotate
from .mla import MLA_PARAMS, LatentAttention


def half_split(table: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A cos or sin table laid out for half-split pairs (i, i + d/2), from one laid out as `layout` says."""
    half = table[..., 0::2] if layout.interleaved else table[..., : table.shape[-1] // 2]
    return torch.cat((half, half), dim=-1)


def highest(index: torch.Tensor, k: int) -> torch.Tensor:
    """The positions of the k highest index scores of each row (all of a shorter row), equal scores to the earlier position.

    The tie rule makes the choice a function of the scores alone: ReLU makes exact ties common (every head's term 0),
    and topk breaks them by the row's length, which differs between a whole sequence and a decoding step's cache.
    """
    return index.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def lightning_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The indexer's score of each key for each query, sum_h w_h relu(q_h . k / sqrt(d)) with w = weights / sqrt(heads),
    from queries (B, heads, T, d), keys shared by the heads (B, 1, S, d) and weights (B, T, heads); (B, T, S)."""
    heads, width = q.shape[1], q.shape[-1]
    scores = torch.relu(q.transpose(1, 2) @ k.transpose(-1, -2) * width ** -0.5)  # (B, T, heads, S)
    return ((weights * heads ** -0.5).unsqueeze(-2) @ scores).squeeze(-2)


class LightningIndexer(nn.Module):
    """DeepSeek-V3.2's indexer: ReLU-weighted scores of every earlier key for each query (transformers' weight names)."""

    def __init__(self, d_model: int, q_lora_rank: int, heads: int, head_dim: int, rope_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.rope_dim = heads, head_dim, rope_dim
        self.wq_b = nn.Linear(q_lora_rank, heads * head_dim, bias=False)
        self.wk = nn.Linear(d_model, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(d_model, heads, bias=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Index scores (B, T, T): -inf on future keys."""
        return self.score(x, q_latent, cos, sin, layout, self.keys(x, cos, sin, layout), torch.arange(x.shape[1], device=x.device))

    @torch.no_grad()
    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Each token's indexer key (B, T, d), LayerNorm'd and rotated: one key for all heads (what decoding caches)."""
        cos, sin = half_split(cos, layout), half_split(sin, layout)
        return rotate(self.k_norm(self.wk(x)), cos, sin, Layout(0, cos.shape[-1], False))

    @torch.no_grad()
    def score(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout, keys: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
        """Index scores (B, T, S) of the T queries at `positions` over keys (B, S, d) of positions 0..S-1: -inf on later keys."""
        batch, length, _ = x.shape
        cos, sin = half_split(cos, layout), half_split(sin, layout)
        rope = Layout(0, cos.shape[-1], False)
        q = rotate(self.wq_b(q_latent).view(batch, length, self.heads, self.head_dim).transpose(1, 2), cos, sin, rope)
        index = lightning_scores(q, keys.unsqueeze(1), self.weights_proj(x))  # (B, T, S)
        later = torch.arange(keys.shape[1], device=x.device)[None, :] > positions[:, None]
        return index.masked_fill(later, float("-inf"))


@register(
    "dsa",
    "mixer",
    Param("topk", int, "keys each query attends, chosen by the indexer", default=2048, minimum=1, maximum=1 << 30),
    Param("index_heads", int, "indexer heads", default=64, minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("index_head_dim", int, "width of an indexer head (its key is cached)", default=128, minimum=1, maximum=MAX_WIDTH,
          positional=False),
    *(param for param in MLA_PARAMS if param.name != "absorb"),
)
class SparseLatentAttention(LatentAttention):
    """DeepSeek sparse attention: MLA over the top-k keys a lightning indexer picks for each query."""

    def __init__(self, config: ModelConfig, topk: int, index_heads: int, index_head_dim: int, **mla: Any) -> None:
        super().__init__(config, absorb=True, **mla)
        self.topk = topk
        self.indexer = LightningIndexer(config.d_model, self.q_lora_rank, index_heads, index_head_dim, self.rope_dim)

    @classmethod
    def check(cls, config: ModelConfig, **args: Any) -> str | None:
        if not args["q_lora_rank"]:
            return "the indexer reads the query latent: give q_lora_rank (DeepSeek-V3.2: 1536)"
        if args["qk_rope_head_dim"] > args["index_head_dim"]:
            return (f"qk_rope_head_dim = {args['qk_rope_head_dim']} RoPE channels do not fit an indexer head of "
                    f"index_head_dim = {args['index_head_dim']}")
        return super().check(config, **args)

    @classmethod
    def describe(cls, call: Call, config: ModelConfig) -> list[str]:
        args = call.kwargs()
        return [*super().describe(call, config), f"top {args['topk']} keys by {args['index_heads']} x {args['index_head_dim']} indexer"]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q_nope, q_rope, q_latent = self.queries(x, cos, sin)
        latent, k_rope = self.latents(x, cos, sin)
        index = self.indexer(x, q_latent, cos, sin, self.layout)
        positions = torch.arange(x.shape[1], device=x.device)
        return self.output(x, self.attend_chosen(q_nope, q_rope, torch.cat((latent, k_rope), dim=-1), index, positions))

    def attend_chosen(self, q_nope: torch.Tensor, q_rope: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, positions: torch.Tensor
                      ) -> torch.Tensor:
        """Absorbed-form attention of each query (at `positions`) over the `topk` keys of [latent | RoPE key] (B, 1, S, r + rope) its
        index scores (B, T, S) rank highest; (B, H, T, v_head_dim)."""
        chosen = highest(index, self.topk)  # (B, T, k)
        q = self.absorbed_queries(q_nope, q_rope).transpose(1, 2)  # (B, T, H, r + rope)
        keys = keys.squeeze(1)  # (B, S, r + rope): one key/value head for all
        picked = keys[torch.arange(keys.shape[0], device=keys.device)[:, None, None], chosen]  # (B, T, k, r + rope)
        scores = q @ picked.transpose(-1, -2) * self.scale  # (B, T, H, k)
        earlier = chosen <= positions[:, None]  # a query short of k keys picks later ones too
        weights = scores.masked_fill(~earlier.unsqueeze(2), float("-inf")).softmax(dim=-1)
        out = weights @ picked[..., : self.kv_lora_rank]  # (B, T, H, r)
        return out.transpose(1, 2) @ self.up_projections()[1].transpose(1, 2)

    def state(self, batch: int, capacity: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """MLA's latent cache and the indexer's key of every position (B, capacity, index_head_dim)."""
        return {**super().state(batch, capacity, device, dtype),
                "index_keys": torch.zeros(batch, capacity, self.indexer.head_dim, device=device, dtype=dtype)}

    def decode(self, state: dict[str, torch.Tensor], start: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Each new query attends the top-k of every cached position by its index score, as forward chooses them."""
        q_nope, q_rope, q_latent = self.queries(x, cos, sin)
        cached = self.cache(state, start, x, cos, sin)
        end = cached.shape[2]
        state["index_keys"][:, start:end] = self.indexer.keys(x, cos, sin, self.layout)
        positions = torch.arange(start, end, device=x.device)
        index = self.indexer.score(x, q_latent, cos, sin, self.layout, state["index_keys"][:, :end], positions)
        return self.output(x, self.attend_chosen(q_nope, q_rope, cached, index, positions))

    def cache_elements(self, seq_len: int) -> int:
        return super().cache_elements(seq_len) + self.indexer.head_dim * seq_len

    def flop_handles(self, seq_len: int) -> dict[str, Callable]:
        # Every product is a matmul fvcore counts at its shape: the indexer's T x T, attention's T x topk. Its key's
        # LayerNorm counts nothing, as no other norm does (RMSNorm is elementwise ops fvcore skips).
        return {"aten::layer_norm": lambda inputs, outputs: 0}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, topk={self.topk}"
