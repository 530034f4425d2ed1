"""DeepSeek sparse attention (`dsa`, DeepSeek-V3.2): MLA where each query attends only the `topk` keys a lightning
indexer picks.

The indexer has its own small heads: queries from MLA's query latent (`wq_b`), one key per token from the input
(`wk`, LayerNorm'd, cached beside the latent), RoPE on the first qk_rope_head_dim channels of each (half-split
pairs, whatever MLA's own layout). A query's score of key t is sum_h w_h relu(q_h . k_t / sqrt(d)), the weights
w = weights_proj(x) / sqrt(heads); causal keys only, scored by blocks of queries against their prefix (counted so).
The choice is not differentiable, so the indexer gets no gradient from the language loss (transformers likewise);
while training it learns from DeepSeek-V3.2's own loss, KL(heads' mean attention on the chosen keys || softmax of
its scores), weighted by `index_loss` and returned as the layer's aux loss, on detached inputs.

Attention then runs in MLA's absorbed form over the chosen keys only: their latents and RoPE keys are gathered
(B, T, topk, ...) and every head scores those, so attention costs T x topk, not T^2 (counted so: the products are
matmuls over the gathered keys). A query with fewer than `topk` earlier keys sees all of them.

Decoding keeps MLA's latent cache and the indexer's key of every position (`cache_elements` counts both): each new
query scores every cached index key and attends the top-k positions, as forward chooses them (equal scores to the
earlier position, in both).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...ir import MAX_WIDTH, Call, ModelConfig
from .. import Param, register
from ..position.rope import Layout, rotate
from .mla import MLA_PARAMS, LatentAttention

INDEX_BLOCK = 256  # queries the indexer scores at once: (batch, block, heads, prefix) scores held
ATTEND_BLOCK_KEYS = 1 << 13  # gathered key rows one block of queries holds: 3 MB at 96 wide, within the caches the products read


def half_split(table: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A cos or sin table laid out for half-split pairs (i, i + d/2), from one laid out as `layout` says."""
    half = table[..., 0::2] if layout.interleaved else table[..., : table.shape[-1] // 2]
    return torch.cat((half, half), dim=-1)


def highest(index: torch.Tensor, k: int) -> torch.Tensor:
    """The positions of the k highest index scores of each row (all of a shorter row), equal scores to the earlier position.

    The tie rule makes the choice a function of the scores alone: ReLU makes exact ties common (every head's term 0),
    and topk breaks them by the row's length, which differs between a whole sequence and a decoding step's cache.
    """
    # topk, then the ties at its k-th value taken from the front: a full stable sort of every row costs several times more
    values, indices = index.topk(k, dim=-1, sorted=False)
    kth = values.amin(-1, keepdim=True)
    # no row with more than k scores at or above its k-th: topk's are the k highest (on the meta device, only shapes count)
    if index.is_meta or bool(((index >= kth).sum(-1) == k).all()):
        return indices
    above, ties = index > kth, index == kth
    keep = above | (ties & (ties.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
    # exactly k kept per row: the i-th to slot i (the others to a spare slot k, dropped), in position order
    slots = torch.where(keep, keep.cumsum(-1) - 1, k)
    positions = torch.arange(index.shape[-1], device=index.device).expand_as(slots)
    return slots.new_empty(*index.shape[:-1], k + 1).scatter_(-1, slots, positions)[..., :k]


class LightningIndexer(nn.Module):
    """DeepSeek-V3.2's indexer: ReLU-weighted scores of every earlier key for each query (transformers' weight names)."""

    def __init__(self, d_model: int, q_lora_rank: int, heads: int, head_dim: int, rope_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.rope_dim = heads, head_dim, rope_dim
        self.wq_b = nn.Linear(q_lora_rank, heads * head_dim, bias=False)
        self.wk = nn.Linear(d_model, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(d_model, heads, bias=False)

    def project(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, T, heads, d) pre-scaled by 1/sqrt(d), the one key per token (B, T, d), head weights (B, T, heads)."""
        batch, length, _ = x.shape
        cos, sin = half_split(cos, layout), half_split(sin, layout)
        rope = Layout(0, cos.shape[-1], False)
        q = rotate(self.wq_b(q_latent).view(batch, length, self.heads, self.head_dim).transpose(1, 2), cos, sin, rope)
        k = rotate(self.k_norm(self.wk(x)).unsqueeze(1), cos, sin, rope).squeeze(1)
        return q.transpose(1, 2) * self.head_dim ** -0.5, k, self.weights_proj(x) * self.heads ** -0.5

    @staticmethod
    def score(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Index scores sum_h w_h relu(q_h . k) of queries (..., Tq, heads, d) against keys (..., Tk, d): (..., Tq, Tk)."""
        products = q.flatten(-3, -2) @ k.transpose(-1, -2)  # one GEMM (Tq * heads, d) x (d, Tk), not Tq products heads rows tall
        return (weights.unsqueeze(-2) @ torch.relu(products).unflatten(-2, q.shape[-3:-1])).squeeze(-2)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Index scores (B, T, T): -inf on future keys (the plain reference of `choose`)."""
        index = self.score(*self.project(x, q_latent, cos, sin, layout))
        future = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        return index.masked_fill(future, float("-inf"))

    @staticmethod
    @torch.no_grad()
    def choose(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, topk: int) -> torch.Tensor:
        """Each query's `topk` highest-scoring earlier keys (B, T, topk), unordered, from `project`'s queries, keys and
        weights; a query with fewer earlier keys gets keys 0..topk-1 (the later ones masked by the caller). Scored causally
        by blocks of queries, each against its prefix only: about half the products of the full T x T, and a block's
        scores are all that is ever held."""
        batch, length = k.shape[:2]
        chosen = torch.arange(topk, device=k.device).expand(batch, length, topk).clone()
        for start in range(topk, length, INDEX_BLOCK):  # queries before position topk keep keys 0..topk-1: nothing to choose
            end = min(start + INDEX_BLOCK, length)
            index = LightningIndexer.score(q[:, start:end], k[:, :end], weights[:, start:end])  # (B, block, end)
            future = torch.arange(end, device=k.device) > torch.arange(start, end, device=k.device)[:, None]
            chosen[:, start:end] = highest(index.masked_fill_(future, float("-inf")), topk)
        return chosen

    @staticmethod
    def kl_loss(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, visible: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3.2's indexer loss from `project`'s outputs: KL(target || softmax of the index scores) over each query's
        visible chosen keys, averaged over queries."""
        batch, length = chosen.shape[:2]
        rows = (chosen + torch.arange(batch, device=k.device).view(-1, 1, 1) * length).flatten(0, 1)
        parts = (q.flatten(0, 1), k.flatten(0, 1), weights.flatten(0, 1), rows, visible.expand_as(chosen).flatten(0, 1), target.flatten(0, 1))
        if k.is_meta:  # the analysis: every product at its shape
            return chosen_kl(*parts) / (batch * length)
        return ChosenIndexLoss.apply(*parts) / (batch * length)


def lightning_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The indexer's score of each key for each query, sum_h w_h relu(q_h . k / sqrt(d)) with w = weights / sqrt(heads),
    from unscaled queries (B, heads, T, d), keys shared by the heads (B, 1, S, d) and weights (B, T, heads); (B, T, S)."""
    heads, width = q.shape[1], q.shape[-1]
    return LightningIndexer.score(q.transpose(1, 2) * width ** -0.5, k.squeeze(1), weights * heads ** -0.5)


def chosen_kl(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, visible: torch.Tensor, target: torch.Tensor
              ) -> torch.Tensor:
    """Summed KL(target || softmax(index scores)) of queries q (N, heads, d) over their chosen rows (N, k) of keys k (M, d)."""
    index = LightningIndexer.score(q.unsqueeze(-3), k[rows], weights.unsqueeze(-2)).squeeze(-2)  # (N, k); backward: index_put_
    log_index = index.masked_fill(~visible, float("-inf")).log_softmax(-1).masked_fill(~visible, 0.0)
    return (torch.xlogy(target, target) - target * log_index).sum()


class ChosenIndexLoss(torch.autograd.Function):
    """`chosen_kl` by blocks of queries, its plain form: each block's chosen index keys gathered into one reused buffer, the
    softmax of its scores kept for backward (N, k) and their products recomputed there, the keys' gradient added back to
    their rows block by block."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, visible: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        probabilities, total = torch.empty_like(target), q.new_zeros(())
        buffers = Buffers(q, k, rows)
        for block in query_blocks(q.shape[0], rows.shape[1]):
            picked = gather(k, rows[block], buffers.picked)
            products = torch.bmm(q[block], picked.transpose(1, 2), out=buffers.scores[: len(picked)]).clamp_min_(0)
            index = torch.bmm(weights[block].unsqueeze(1), products).squeeze(1)  # (block, k)
            log_index = index.masked_fill_(~visible[block], float("-inf")).log_softmax(-1)
            torch.exp(log_index, out=probabilities[block])
            total += (torch.xlogy(target[block], target[block]) - target[block] * log_index.masked_fill_(~visible[block], 0.0)).sum()
        ctx.save_for_backward(q, k, weights, rows, target, probabilities)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, weights, rows, target, probabilities = ctx.saved_tensors
        grad_q, grad_k, grad_weights = torch.empty_like(q), torch.zeros_like(k), torch.empty_like(weights)
        grad_index = (probabilities * target.sum(-1, keepdim=True) - target).mul_(grad_total)  # (N, k): zero where not visible
        buffers = Buffers(q, k, rows)
        for block in query_blocks(q.shape[0], rows.shape[1]):
            picked = gather(k, rows[block], buffers.picked)
            relu = torch.bmm(q[block], picked.transpose(1, 2), out=buffers.scores[: len(picked)]).clamp_min_(0)  # (block, h, k)
            torch.bmm(relu, grad_index[block].unsqueeze(-1), out=grad_weights[block].unsqueeze(-1))
            grad_products = relu.sign_().mul_(grad_index[block].unsqueeze(1)).mul_(weights[block].unsqueeze(-1))  # relu' is 0 at 0
            torch.bmm(grad_products, picked, out=grad_q[block])
            grad_picked = torch.bmm(grad_products.transpose(1, 2), q[block], out=buffers.grad_picked[: len(picked)])
            grad_k.index_add_(0, rows[block].flatten(), grad_picked.flatten(0, 1))
        return grad_q, grad_k, grad_weights, None, None, None


def attend_gathered(q: torch.Tensor, keys: torch.Tensor, chosen: torch.Tensor, visible: torch.Tensor, scale: float, value_width: int
                    ) -> torch.Tensor:
    """The plain form: every query's chosen keys gathered at once, (B, T, k, W) (their first value_width channels the
    values); softmax over the visible ones; (B, T, H, value_width) and the heads' mean weights (B, T, k), not differentiated.
    `ChosenAttention` computes the same by blocks."""
    picked = keys[torch.arange(keys.shape[0], device=keys.device)[:, None, None], chosen]  # (B, T, k, W)
    scores = q @ picked.transpose(-1, -2) * scale  # (B, T, H, k)
    weights = scores.masked_fill(~visible.unsqueeze(-2), float("-inf")).softmax(dim=-1)
    return weights @ picked[..., :value_width], weights.detach().mean(-2)


class ChosenAttention(torch.autograd.Function):
    """Attention of each query row over its own chosen key rows, in blocks of queries, recomputed in backward.

    All heads share a query's selection (the absorbed form has one key/value head), so a block's keys are gathered
    once, (block, k, W), and every head scores them in one batched matmul. Only each row's log-sum-exp is kept for
    backward, never the gathered keys: memory stays a block's worth, and the keys' gradient is added back to their
    rows (index_add_) block by block. q (N, H, W); keys (M, W), their first value_width channels the values; chosen
    (N, k) rows of keys; visible (N, k) which of them count; returns (N, H, value_width) and, not differentiable, the
    heads' mean attention weight on each chosen key (N, k) (the indexer's training target).
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, keys: torch.Tensor, chosen: torch.Tensor, visible: torch.Tensor, scale: float,
                value_width: int) -> torch.Tensor:
        out = q.new_empty(*q.shape[:2], value_width)
        lse, mean_weights = q.new_empty(q.shape[:2]), q.new_empty(chosen.shape)
        scaled = q * scale  # once, not on every block's scores
        buffers = Buffers(q, keys, chosen)
        for rows in query_blocks(q.shape[0], chosen.shape[1]):
            picked = gather(keys, chosen[rows], buffers.picked)
            scores = block_scores(scaled[rows], picked, visible[rows], buffers.scores)
            peak = scores.amax(-1, keepdim=True)
            weights = scores.sub_(peak).exp_()  # each score's exponential once
            total = weights.sum(-1, keepdim=True)
            torch.add(peak, total.log(), out=lse[rows].unsqueeze(-1))
            weights.div_(total)
            torch.bmm(weights, picked[..., :value_width], out=out[rows])
            torch.mean(weights, 1, out=mean_weights[rows])
        ctx.save_for_backward(scaled, keys, chosen, visible, out, lse)
        ctx.scale, ctx.value_width = scale, value_width
        ctx.mark_non_differentiable(mean_weights)
        return out, mean_weights

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        scaled, keys, chosen, visible, out, lse = ctx.saved_tensors
        heads, value_width = scaled.shape[1], ctx.value_width
        grad_q, grad_keys = torch.empty_like(scaled), torch.zeros_like(keys)
        row_dot = (grad_out * out).sum(-1, keepdim=True)  # (N, H, 1): softmax backward's sum_j p_j dp_j
        # the keys' gradient is one product per block, (k, 2H) x (2H, W): [score gradients | weights] against [queries | output
        # gradients, zero-padded], the value part riding on the key part rather than a second product only H deep
        factors = torch.cat((scaled, F.pad(grad_out, (0, keys.shape[1] - value_width))), dim=1)  # (N, 2H, W)
        buffers = Buffers(scaled, keys, chosen)
        for rows in query_blocks(scaled.shape[0], chosen.shape[1]):
            picked = gather(keys, chosen[rows], buffers.picked)
            both = buffers.both[: len(picked)]
            weights = block_scores(scaled[rows], picked, visible[rows], both[:, heads:])
            weights.sub_(lse[rows].unsqueeze(-1)).exp_()  # (block, H, k)
            grad_scores = torch.baddbmm(row_dot[rows], grad_out[rows], picked[..., :value_width].transpose(1, 2), beta=-1,
                                        out=both[:, :heads]).mul_(weights)
            torch.bmm(grad_scores, picked, out=grad_q[rows])
            grad_picked = torch.bmm(both.transpose(1, 2), factors[rows], out=buffers.grad_picked[: len(picked)])  # (block, k, W)
            grad_keys.index_add_(0, chosen[rows].flatten(), grad_picked.flatten(0, 1))
        return grad_q.mul_(ctx.scale), grad_keys, None, None, None, None


def query_blocks(rows: int, keys_each: int) -> Iterator[slice]:
    """Slices of query rows whose gathered keys hold about ATTEND_BLOCK_KEYS rows together."""
    size = max(1, ATTEND_BLOCK_KEYS // keys_each)
    return (slice(start, min(start + size, rows)) for start in range(0, rows, size))


class Buffers:
    """One block's working tensors, allocated once per call and reused by every block: blocks of fresh multi-megabyte
    tensors each go to the OS and back (mmap, page faults) once anything larger has been freed, several times slower."""

    def __init__(self, q: torch.Tensor, keys: torch.Tensor, chosen: torch.Tensor) -> None:
        block, topk = min(q.shape[0], max(1, ATTEND_BLOCK_KEYS // chosen.shape[1])), chosen.shape[1]
        self.picked = keys.new_empty(block, topk, keys.shape[1])
        self.grad_picked = torch.empty_like(self.picked)
        self.scores = q.new_empty(block, q.shape[1], topk)
        self.both = q.new_empty(block, 2 * q.shape[1], topk)  # backward's score gradients beside the weights


def gather(keys: torch.Tensor, chosen: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The key rows (M, W) a block of queries chose (block, k): (block, k, W), written into the front of `out`."""
    picked = out[: chosen.shape[0]]
    torch.index_select(keys, 0, chosen.flatten(), out=picked.view(-1, keys.shape[1]))
    return picked


def block_scores(q: torch.Tensor, picked: torch.Tensor, visible: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Scores (block, H, k) of a block's (scaled) queries (block, H, W) on its gathered keys, -inf where not visible; into `out`."""
    scores = torch.bmm(q, picked.transpose(1, 2), out=out[: q.shape[0]])
    if not bool(visible.all()):  # only queries with fewer earlier keys than k hold any
        scores.masked_fill_(~visible.unsqueeze(1), float("-inf"))
    return scores


@register(
    "dsa",
    "mixer",
    Param("topk", int, "keys each query attends, chosen by the indexer", default=2048, minimum=1, maximum=1 << 30),
    Param("index_heads", int, "indexer heads", default=64, minimum=1, maximum=MAX_WIDTH, positional=False),
    Param("index_head_dim", int, "width of an indexer head (its key is cached)", default=128, minimum=1, maximum=MAX_WIDTH,
          positional=False),
    Param("index_loss", float, "weight of the indexer's KL loss to the attention's distribution (DeepSeek-V3.2); 0: untrained",
          default=1.0, minimum=0, positional=False),
    *(param for param in MLA_PARAMS if param.name != "absorb"),
)
class SparseLatentAttention(LatentAttention):
    """DeepSeek sparse attention: MLA over the top-k keys a lightning indexer picks for each query; returns (output, weighted indexer loss)."""

    outputs = ("out", "aux_loss")

    def __init__(self, config: ModelConfig, topk: int, index_heads: int, index_head_dim: int, index_loss: float, **mla: Any) -> None:
        super().__init__(config, absorb=True, **mla)
        self.topk, self.index_loss = topk, index_loss
        self.indexer = LightningIndexer(config.d_model, self.q_lora_rank or self.kv_lora_rank, index_heads, index_head_dim, self.rope_dim)

    @classmethod
    def check(cls, config: ModelConfig, **args: Any) -> str | None:
        if not args["q_lora_rank"] and not args["shared_latent"]:
            return "the indexer reads the query latent: give q_lora_rank (DeepSeek-V3.2: 1536) or shared_latent"
        if args["qk_rope_head_dim"] > args["index_head_dim"]:
            return (f"qk_rope_head_dim = {args['qk_rope_head_dim']} RoPE channels do not fit an indexer head of "
                    f"index_head_dim = {args['index_head_dim']}")
        return super().check(config, **args)

    @classmethod
    def describe(cls, call: Call, config: ModelConfig) -> list[str]:
        args = call.kwargs()
        return [*super().describe(call, config), f"top {args['topk']} keys by {args['index_heads']} x {args['index_head_dim']} indexer"]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent, k_rope = self.latents(x, cos, sin)
        q_nope, q_rope, q_latent = self.queries(x, cos, sin, latent)
        batch, length, _ = x.shape
        positions = torch.arange(length, device=x.device)
        topk, learns = min(self.topk, length), bool(self.index_loss) and self.training  # inference skips the indexer's loss
        if length > topk or learns:  # with every earlier key kept and no loss, the indexer has nothing to do
            # detached inputs: the indexer learns from its own loss alone, the rest of the model from the language loss
            with torch.set_grad_enabled(learns and torch.is_grad_enabled()):
                index_q, index_k, index_weights = self.indexer.project(x.detach(), q_latent.detach(), cos, sin, self.layout)
        if length > topk:
            chosen = self.indexer.choose(index_q, index_k, index_weights, topk)
        else:
            chosen = torch.arange(topk, device=x.device).expand(batch, length, topk)
        heads, target = self.attend_chosen(q_nope, q_rope, torch.cat((latent, k_rope), dim=-1).squeeze(1), chosen, positions)
        loss = x.new_zeros(())
        if learns:
            visible = chosen <= positions[:, None]
            loss = self.index_loss * self.indexer.kl_loss(index_q, index_k, index_weights, chosen, visible, target)
        return self.output(x, heads), loss

    def attend_chosen(self, q_nope: torch.Tensor, q_rope: torch.Tensor, keys: torch.Tensor, chosen: torch.Tensor, positions: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Absorbed-form attention of each query (at `positions`) over its chosen rows (B, T, k) of the keys [latent | RoPE key]
        (B, S, r + rope) only: (B, H, T, v_head_dim), and the heads' mean weights on those keys (B, T, k), not differentiated
        (the indexer's target)."""
        q = self.absorbed_queries(q_nope, q_rope).transpose(1, 2)  # (B, T, H, r + rope)
        earlier = chosen <= positions[:, None]  # a query short of k keys picks later ones too
        batch, length = chosen.shape[:2]
        if q.is_meta:  # the analysis: count the products at their shapes
            out, target = attend_gathered(q, keys, chosen, earlier, self.scale, self.kv_lora_rank)
        else:
            rows = chosen + torch.arange(batch, device=chosen.device).view(-1, 1, 1) * keys.shape[1]  # into the batch's keys laid end to end
            out, target = ChosenAttention.apply(q.flatten(0, 1), keys.flatten(0, 1), rows.flatten(0, 1),
                                                earlier.expand_as(chosen).flatten(0, 1), self.scale, self.kv_lora_rank)
            out, target = out.view(batch, length, self.n_heads, self.kv_lora_rank), target.view(chosen.shape)
        return out.transpose(1, 2) @ self.up_projections()[1].transpose(1, 2), target

    def state(self, batch: int, capacity: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """MLA's latent cache and the indexer's key of every position (B, capacity, index_head_dim)."""
        return {**super().state(batch, capacity, device, dtype),
                "index_keys": torch.zeros(batch, capacity, self.indexer.head_dim, device=device, dtype=dtype)}

    def decode(self, state: dict[str, torch.Tensor], start: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each new query attends the top-k of every cached position by its index score, as forward chooses them (no indexer loss)."""
        latent, k_rope = self.latents(x, cos, sin)
        q_nope, q_rope, q_latent = self.queries(x, cos, sin, latent)
        cached = self.cache(state, start, latent, k_rope).squeeze(1)
        end = cached.shape[1]
        index_q, index_k, index_weights = self.indexer.project(x, q_latent, cos, sin, self.layout)
        state["index_keys"][:, start:end] = index_k
        positions = torch.arange(start, end, device=x.device)
        index = self.indexer.score(index_q, state["index_keys"][:, :end], index_weights)  # (B, T, end)
        index = index.masked_fill(torch.arange(end, device=x.device) > positions[:, None], float("-inf"))
        chosen = highest(index, min(self.topk, end))
        return self.output(x, self.attend_chosen(q_nope, q_rope, cached, chosen, positions)[0]), x.new_zeros(())

    def cache_elements(self, seq_len: int) -> int:
        return super().cache_elements(seq_len) + self.indexer.head_dim * seq_len

    def flop_handles(self, seq_len: int) -> dict[str, Callable]:
        # Every product is a matmul fvcore counts at its shape: the indexer's T x T, attention's T x topk. Its key's
        # LayerNorm counts nothing, as no other norm does (RMSNorm is elementwise ops fvcore skips).
        return {"aten::layer_norm": lambda inputs, outputs: 0}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, topk={self.topk}"
