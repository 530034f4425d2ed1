"""Linear attention with a scalar decay per head and token: S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t.

The recurrence shared by lightning attention (g constant per head: the slope) and Mamba-2's SSD (g_t = dt_t A,
k = B, q = C, v = dt x). Three forms of one signature, f(q, k, v, g, ..., state) -> (o, final state), with
q, k (B, H, T, dk), v (B, H, T, dv), g (B, H, T) log-decays <= 0 and the state (B, H, dk, dv):
- `chunked`: the training form. Within a chunk of C tokens, o = ((Q K^T) * D) V with D[i, j] = exp(G_i - G_j)
  for j <= i (G the in-chunk cumulative log-decay); across chunks, the state each chunk starts from, carried by
  one elementwise recurrence per chunk. Lengths not a multiple of C are padded with k = v = 0 and g = 0, which
  leave the state as it is.
- `recurrent`: one token at a time through `step`, what decoding runs.
- `naive`: the paper's equation written out over the whole sequence, o_t = sum_{s<=t} exp(G_t - G_s)(q_t . k_s) v_s
  + exp(G_t) q_t S_0 with G the cumulative log-decay, a (T, T) matrix: the reference the others are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cumulative_log_decay(g: torch.Tensor) -> torch.Tensor:
    """Cumulative sum over the last dimension in at least fp32 (bf16 sums of many decays drift)."""
    return g.to(torch.promote_types(g.dtype, torch.float32)).cumsum(-1)


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, chunk: int, state: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-parallel form: intra-chunk as (C, C) matrices, inter-chunk through the state."""
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    pad = -length % chunk
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g = F.pad(g, (0, pad))
    n = (length + pad) // chunk
    q, k, v = q.view(batch, heads, n, chunk, dk), k.view(batch, heads, n, chunk, dk), v.view(batch, heads, n, chunk, dv)
    cumulative = cumulative_log_decay(g.view(batch, heads, n, chunk))
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # masked before exp: above the diagonal the differences are positive and could overflow
    decay = (cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(~causal, float("-inf")).exp().to(q.dtype)
    out = ((q @ k.transpose(-1, -2)) * decay) @ v
    last = cumulative[..., -1:]
    contribution = (k * (last - cumulative).exp().to(k.dtype)[..., None]).transpose(-1, -2) @ v  # (B, H, n, dk, dv)
    chunk_decay = last.exp().to(q.dtype)[..., None]  # (B, H, n, 1, 1)
    current = state.to(q.dtype) if state is not None else q.new_zeros(batch, heads, dk, dv)
    starts = []
    for i in range(n):
        starts.append(current)
        current = chunk_decay[:, :, i] * current + contribution[:, :, i]
    out = out + (q * cumulative.exp().to(q.dtype)[..., None]) @ torch.stack(starts, dim=2)
    return out.view(batch, heads, n * chunk, dv)[:, :, :length], current


def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: q, k (B, H, dk), v (B, H, dv), g (B, H) and the state (B, H, dk, dv) -> output (B, H, dv), next state."""
    state = g.exp()[..., None, None].to(state.dtype) * state + k[..., :, None] * v[..., None, :]
    return (q[..., None, :] @ state)[..., 0, :], state


def recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, chunk: int = 0, state: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token form through `step` (`chunk` is unused: the signature is the chunked form's)."""
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

