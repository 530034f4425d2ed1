"""Linear attention with a scalar decay per head and token: S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t.

The recurrence shared by lightning attention (g constant per head: the slope) and Mamba-2's SSD (g_t = dt_t A,
k = B, q = C, v = dt x). Three forms of one signature, f(q, k, v, g, ..., state) -> (o, final state), with
q, k (B, G, T, dk) shared by groups of heads (G dividing H; G = H without groups), v (B, H, T, dv), g (B, H, T)
log-decays <= 0 and the state (B, H, dk, dv):
- `chunked`: the training form. Within a chunk of C tokens, o = ((Q K^T) * D) V with D[i, j] = exp(G_i - G_j)
  for j <= i (G the in-chunk cumulative log-decay); across chunks, the state each chunk starts from, carried by
  one elementwise recurrence per chunk. A length not a multiple of C ends with one shorter chunk. Work per token is
  O(C (dk + dv) + dk dv) whatever T; only (C, C) decay matrices are built, never (T, T). Decay factors below e^-30
  are taken as 0 (`factor`): as denormal floats they made the CPU's products several times slower. Long sequences
  run in segments of whole chunks, the state carried between them (`SEGMENT_BYTES`).
- `recurrent`: one token at a time through `step`, what decoding runs.
- `naive`: the paper's equation written out over the whole sequence, o_t = sum_{s<=t} exp(G_t - G_s)(q_t . k_s) v_s
  + exp(G_t) q_t S_0 with G the cumulative log-decay, a (T, T) matrix: the reference the others are tested against.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

FLUSHED = 30.0  # e^-30 ~ 1e-13: decay factors below it count as 0 in the chunked form
# The chunked form runs long sequences in segments of whole chunks, the state carried, so that its (heads, n, C, C)
# tensors stay below 32 MiB: glibc maps larger blocks afresh at every allocation (and unmaps them at free), every page
# faulted in and zeroed again, which made the same work per token ~1.3-1.6x dearer at 8192 tokens than at 2048.
SEGMENT_BYTES = 16 << 20


def cumulative_log_decay(g: torch.Tensor) -> torch.Tensor:
    """Cumulative sum over the last dimension in at least fp32 (bf16 sums of many decays drift)."""
    return g.to(torch.promote_types(g.dtype, torch.float32)).cumsum(-1)


def factor(log_decay: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """exp(log_decay) in `dtype`, factors below e^-FLUSHED set to 0: beneath the resolution of the sums they join, and
    products of such factors underflow to denormals, which slow CPU matmuls and multiplications several times over."""
    return log_decay.masked_fill(log_decay < -FLUSHED, float("-inf")).exp().to(dtype)


def tokens_within(budget: int, bytes_per_token: int, multiple: int = 1) -> int:
    """The most tokens, a multiple of `multiple` and at least one multiple, whose tensors of `bytes_per_token` fit `budget`."""
    return multiple * max(1, budget // (bytes_per_token * multiple))


def segment_length(heads: int, chunk: int, itemsize: int) -> int:
    """Tokens per segment of the chunked form: the most whole chunks whose (heads, n, C, C) tensors fit SEGMENT_BYTES."""
    return tokens_within(SEGMENT_BYTES, heads * chunk * itemsize, chunk)


def decay_matrix(cumulative: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """D[i, j] = exp(G_i - G_j) for j <= i within each chunk, 0 above the diagonal, (..., C) -> (..., C, C): built in one
    buffer (-inf added above the diagonal before exp, where the differences are positive and could overflow)."""
    chunk = cumulative.shape[-1]
    above = torch.full((chunk, chunk), float("-inf"), device=cumulative.device, dtype=cumulative.dtype).triu(1)
    log_decay = (cumulative[..., :, None] - cumulative[..., None, :]).add_(above)
    return F.threshold_(log_decay, -FLUSHED, float("-inf")).exp_().to(dtype)


def intra_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cumulative: torch.Tensor) -> torch.Tensor:
    """((Q K^T) * D) V per chunk, Q K^T once per group: q, k (B, G, n, C, dk), v (B, G, shared, n, C, dv), cumulative
    (B, G, shared, n or 1, C) -> (B, G, shared, n, C, dv); as plain products (`IntraChunk` is the fast form)."""
    causal = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool, device=q.device).tril()
    decay = factor((cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(~causal, float("-inf")), q.dtype)
    return ((q @ k.transpose(-1, -2))[:, :, None] * decay) @ v


class IntraChunk(torch.autograd.Function):
    """`intra_chunk` with its backward written out: the (heads, n, C, C) tensors are the decays, the weights and their
    gradient (autograd's masks, negations and broadcast reductions made a dozen). With W = (Q K^T) * D, the log-decay
    differences' gradient is dW * W, whose row sums minus column sums are the cumulative log-decay's gradient. Products
    are 3-d bmm on contiguous operands, transposes as strides (matmul's batch folding copied each transposed operand)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cumulative: torch.Tensor) -> torch.Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        scores = torch.bmm(q.flatten(0, -3), k.flatten(0, -3).transpose(1, 2)).view(*q.shape[:-1], q.shape[-2])
        decay = decay_matrix(cumulative, q.dtype)
        # one head per group (lightning's): the weights overwrite the scores, which backward does not need
        weights = scores[:, :, None].mul_(decay) if v.shape[2] == 1 else scores[:, :, None] * decay
        ctx.save_for_backward(q, k, v, decay, weights)
        ctx.constant = cumulative.shape[-2] != v.shape[-3]  # one decay for all chunks (lightning's)
        return torch.bmm(weights.flatten(0, -3), v.flatten(0, -3)).view(v.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, decay, weights = ctx.saved_tensors
        flat_grad, flat_v = grad.contiguous().flatten(0, -3), v.flatten(0, -3)
        grad_weights = torch.bmm(flat_grad, flat_v.transpose(1, 2)).view(weights.shape)
        grad_v = torch.bmm(weights.flatten(0, -3).transpose(1, 2), flat_grad).view(v.shape)
        grad_scores = grad_weights * decay
        grad_scores = grad_scores.sum(2) if grad_scores.shape[2] > 1 else grad_scores.squeeze(2)  # over a group's heads
        flat_scores = grad_scores.flatten(0, -3)
        grad_q = torch.bmm(flat_scores, k.flatten(0, -3)).view(q.shape)
        grad_k = torch.bmm(flat_scores.transpose(1, 2), q.flatten(0, -3)).view(k.shape)
        grad_cumulative = None
        if ctx.needs_input_grad[3]:
            grad_log_decay = grad_weights.mul_(weights)
            grad_cumulative = (grad_log_decay.sum(-1) - grad_log_decay.sum(-2)).to(torch.promote_types(q.dtype, torch.float32))
            if ctx.constant:
                grad_cumulative = grad_cumulative.sum(-2, keepdim=True)
        return grad_q, grad_k, grad_v, grad_cumulative


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, chunk: int, state: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-parallel form: intra-chunk as (C, C) matrices, inter-chunk through the state. q and k may have G heads
    dividing v's H (Mamba-2's groups: heads h*G/H .. share them): each group's Q K^T is computed once, and the state
    products of a group's heads are one matrix product with the heads side by side in the columns."""
    length = q.shape[-2]
    span = segment_length(v.shape[0] * v.shape[1], chunk, q.element_size())
    if length > span and not q.is_meta:  # on meta (the analysis) one pass: the same products, a shorter trace
        outs, carried = [], state
        for start in range(0, length, span):
            piece = slice(start, start + span)
            out, carried = chunked(q[..., piece, :], k[..., piece, :], v[..., piece, :], g[..., piece], chunk, carried)
            outs.append(out)
        return torch.cat(outs, dim=-2), carried
    tail = length % chunk
    if tail and length > chunk:  # the last partial chunk as a chunk of its own size: no padding, exact final state
        main = length - tail
        first, carried = chunked(q[..., :main, :], k[..., :main, :], v[..., :main, :], g[..., :main], chunk, state)
        last, final = chunked(q[..., main:, :], k[..., main:, :], v[..., main:, :], g[..., main:], tail, carried)
        return torch.cat([first, last], dim=-2), final
    chunk = min(chunk, length)
    batch, groups, _, dk = q.shape
    heads, dv = v.shape[1], v.shape[-1]
    shared, n = heads // groups, length // chunk
    q, k = q.reshape(batch, groups, n, chunk, dk), k.reshape(batch, groups, n, chunk, dk)
    v = v.reshape(batch, groups, shared, n, chunk, dv)
    # a decay constant along T (lightning's, an expanded tensor) is the same in every chunk: its matrices are built once
    constant = g.stride(-1) == 0
    cumulative = cumulative_log_decay((g[..., :chunk] if constant else g).reshape(batch, groups, shared, 1 if constant else n, chunk))
    intra = intra_chunk if q.is_meta else IntraChunk.apply  # on meta, the plain products fvcore counts
    out = intra(q, k, v, cumulative)  # (B, G, shared, n, C, dv)
    last = cumulative[..., -1:]
    # (k w)^T v = k^T (w v) for the per-token weights w = decay to the chunk's end: one product per group, heads as columns
    weighted = (v * factor(last - cumulative, v.dtype)[..., None]).permute(0, 1, 3, 4, 2, 5).reshape(batch, groups, n, chunk, -1)
    contributions = (k.transpose(-1, -2) @ weighted).view(batch, groups, n, dk, shared, dv).unbind(2)
    chunk_decay = factor(last, v.dtype).permute(0, 1, 3, 4, 2)[..., None]  # (B, G, n or 1, 1, shared, 1)
    # unbind, not indexing per chunk: each index's backward would build a zero tensor of all chunks, quadratic in T
    decays = [chunk_decay[:, :, 0]] * n if constant else chunk_decay.unbind(2)
    current = (state.to(q.dtype).view(batch, groups, shared, dk, dv).transpose(2, 3) if state is not None
               else q.new_zeros(batch, groups, dk, shared, dv))
    starts = []
    for contribution, chunk_factor in zip(contributions, decays):
        starts.append(current)
        current = chunk_factor * current + contribution
    carried = (q @ torch.stack(starts, dim=2).view(batch, groups, n, dk, -1)).view(batch, groups, n, chunk, shared, dv)
    out = out + carried.permute(0, 1, 4, 2, 3, 5) * factor(cumulative, q.dtype)[..., None]
    return out.reshape(batch, heads, length, dv), current.transpose(2, 3).reshape(batch, heads, dk, dv)


def per_head(q: torch.Tensor, k: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of G groups (B, G, ..., d) repeated over each group's heads to (B, heads, ..., d)."""
    shared = heads // q.shape[1]
    return (q, k) if shared == 1 else (q.repeat_interleave(shared, dim=1), k.repeat_interleave(shared, dim=1))


def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: q, k (B, H, dk), v (B, H, dv), g (B, H) and the state (B, H, dk, dv) -> output (B, H, dv), next state."""
    state = g.exp()[..., None, None].to(state.dtype) * state + k[..., :, None] * v[..., None, :]
    return (q[..., None, :] @ state)[..., 0, :], state


def recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, chunk: int = 0, state: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token form through `step` (`chunk` is unused: the signature is the chunked form's)."""
    q, k = per_head(q, k, v.shape[1])
    batch, heads, length, dk = q.shape
    current = state.to(q.dtype) if state is not None else q.new_zeros(batch, heads, dk, v.shape[-1])
    outputs = []
    for t in range(length):
        out, current = step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], current)
        outputs.append(out)
    return torch.stack(outputs, dim=2), current


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, chunk: int = 0, state: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The equation over the whole sequence, a (T, T) decay matrix (`chunk` is unused); for tests."""
    q, k = per_head(q, k, v.shape[1])
    length = q.shape[-2]
    cumulative = cumulative_log_decay(g)
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    decay = (cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    out = ((q @ k.transpose(-1, -2)) * decay) @ v
    to_end = (cumulative[..., -1:] - cumulative).exp()
    final = (k * to_end[..., None]).transpose(-1, -2) @ v
    if state is not None:
        out = out + (q * cumulative.exp()[..., None]) @ state
        final = final + cumulative[..., -1, None, None].exp() * state
    return out, final

