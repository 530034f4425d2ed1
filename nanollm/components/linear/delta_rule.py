"""The gated delta rule in its three forms, shared by gated DeltaNet (a scalar decay per head) and KDA (a decay per key
channel): a naive reference written from the papers' equation, the recurrent form (one token at a time, as decoding
runs), and the chunked parallel form training uses. Layout as fla's naive.py but heads first: q, k (B, H, T, d_k),
v (B, H, T, d_v), the log decay g (B, H, T) or (B, H, T, d_k), beta (B, H, T), the state (B, H, d_k, d_v); all fp32.

Recurrence (Yang et al. 2412.06464; Kimi Linear 2510.26692), with a = exp(g): S_t = (I - beta_t k_t k_t^T) diag(a_t) S_{t-1}
+ beta_t k_t v_t^T, o_t = S_t^T q_t.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import VECTOR, Component, traced_shape


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(|x|^2 + 1e-6) over the last dimension, as fla normalises queries and keys."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def channelwise(g: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the decay is per key channel (KDA) rather than one scalar per head (gated DeltaNet)."""
    return g.dim() == k.dim()


def starting_state(k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    """The given state, or zeros of shape (B, H, d_k, d_v)."""
    return state if state is not None else k.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1])


def naive_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's equation token by token with explicit d_k x d_k transitions: (outputs (B, H, T, d_v), final state)."""
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    S = starting_state(k, v, state)
    outputs = []
    for t in range(k.shape[2]):
        a = g[:, :, t].exp()
        decay = torch.diag_embed(a) if channelwise(g, k) else a[..., None, None] * eye
        k_t, b_t = k[:, :, t], beta[:, :, t, None, None]
        transition = (eye - b_t * k_t[..., :, None] * k_t[..., None, :]) @ decay
        S = transition @ S + b_t * k_t[..., :, None] * v[:, :, t, None, :]
        outputs.append((S.transpose(-1, -2) @ q[:, :, t, :, None])[..., 0])
    return torch.stack(outputs, dim=2), S


def delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token (q, k (B, H, d_k), v (B, H, d_v), g (B, H) or (B, H, d_k), beta (B, H)) -> (output (B, H, d_v), next state)."""
    state = state * (g.exp()[..., None] if channelwise(g, k) else g.exp()[..., None, None])
    remembered = torch.einsum("bhk,bhkv->bhv", k, state)  # what the state already predicts for this key
    state = state + k[..., :, None] * (beta[..., None] * (v - remembered))[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q, state), state


def recurrent_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoding form over a whole sequence: `delta_rule_step` per token, carrying the state."""
    S = starting_state(k, v, state)
    outputs = []
    for t in range(k.shape[2]):
        out, S = delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t], S)
        outputs.append(out)
    return torch.stack(outputs, dim=2), S


def next_power_of_two(size: int) -> int:
    """The smallest power of two >= size (an int, also when tracing hands sizes over as tensors)."""
    return 1 << (int(size) - 1).bit_length()


@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)  # kept across calls: a tensor first made while generating must still serve training
def halving_layout(size: int) -> torch.Tensor:
    """Where each entry of a (size, size) lower-triangular matrix sits in the flat buffer `decayed_scores` builds:
    [the diagonal | each halving level's blocks, as they come out of the matmul | one zero for the rest]."""
    place = torch.full((size, size), -1, dtype=torch.long)
    place[range(size), range(size)] = torch.arange(size)
    offset, half = size, 1
    while half < size:  # blocks of 2 half rows: their lower half's rows against their upper half's columns
        for block in range(size // (2 * half)):
            rows, columns = block * 2 * half + half, block * 2 * half
            place[rows:rows + half, columns:columns + half] = offset + torch.arange(half * half).view(half, half)
            offset += half * half
        half *= 2
    return place.masked_fill(place < 0, offset).flatten()


def decayed_scores(x: torch.Tensor, k: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """(R, ..., C, C): sum_c x_ic k_jc exp(G_ic - G_jc) for j <= i, zeros above, for R kinds of rows x (R, ..., C, d_k)
    against the keys k and a cumulative log decay G (..., C, d_k) per channel; every exponent taken is <= 0, so nothing
    overflows however strong the decay.

    By halving: the pair (i, j) is formed at the level where i and j first fall in different halves of a block, as a
    matmul of x decayed down to the lower half's first row and k decayed from there; the diagonal needs no decay. The
    chunk is padded to a power of two (rows past the end are dropped).
    """
    size = x.shape[-2]
    padded = next_power_of_two(size)
    if padded != size:  # zero rows; the decay held at its last value, so the padded rows' exponents stay <= 0
        x, k = (F.pad(t, (0, 0, 0, padded - size)) for t in (x, k))
        G = torch.cat([G, G[..., -1:, :].expand(*G.shape[:-2], padded - size, G.shape[-1])], dim=-2)
    lead = x.shape[:-2]
    parts = [torch.linalg.vecdot(x, k)]
    half = 1
    while half < padded:
        shape = (*k.shape[:-2], padded // (2 * half), 2, half, k.shape[-1])
        x_low, k_up, G_blocks = x.reshape(x.shape[:1] + shape)[..., 1, :, :], k.reshape(shape)[..., 0, :, :], G.reshape(shape)
        anchor = G_blocks[..., 1, :1, :]  # each block's lower half's first row
        rows = x_low * (G_blocks[..., 1, :, :] - anchor).exp()
        columns = k_up * (anchor - G_blocks[..., 0, :, :]).exp()
        parts.append((rows @ columns.transpose(-1, -2)).flatten(-3))
        half *= 2
    parts.append(x.new_zeros(*lead, 1))
    flat = torch.cat(parts, dim=-1)
    scores = flat.index_select(-1, halving_layout(padded).to(x.device)).view(*lead, padded, padded)
    return scores[..., :size, :size]


INVERSE_BASE = 8  # unit_lower_inverse inverts diagonal blocks of this many rows directly, then joins them


def unit_lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """(I + L)^-1 for L (..., C, C) strictly lower triangular (its diagonal and above are ignored), in matmuls: each
    diagonal block of INVERSE_BASE rows as (I - L)(I + L^2)(I + L^4) (L is nilpotent), then blocks joined pairwise,
    [[A, 0], [B, D]]^-1 = [[A^-1, 0], [-D^-1 B A^-1, D^-1]], until one block is left."""
    size = lower.shape[-1]
    padded = next_power_of_two(size)
    if padded != size:  # identity rows and columns past the end: the leading block's inverse is unchanged
        lower = F.pad(lower, (0, padded - size, 0, padded - size))
    base = min(INVERSE_BASE, padded)
    blocks = padded // base
    tiles = lower.unflatten(-1, (blocks, base)).unflatten(-3, (blocks, base))  # (..., block row, row, block column, column)
    strictly_lower = torch.ones(base, base, dtype=torch.bool, device=lower.device).tril(-1)
    power = -tiles.diagonal(dim1=-4, dim2=-2).movedim(-1, -3).masked_fill(~strictly_lower, 0)  # (..., blocks, base, base)
    inverse = power + torch.eye(base, dtype=lower.dtype, device=lower.device)
    span = 2
    while span < base:
        power = power @ power
        inverse = inverse + inverse @ power
        span *= 2
    size_now = base
    while size_now < padded:
        tiles = lower.unflatten(-1, (padded // size_now, size_now)).unflatten(-3, (padded // size_now, size_now))
        below = tiles.diagonal(offset=-1, dim1=-4, dim2=-2)[..., 0::2].movedim(-1, -3)  # block 2i + 1's rows, block 2i's columns
        first, second = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
        joined_below = -(second @ below @ first)
        inverse = torch.cat([torch.cat([first, first.new_zeros(first.shape)], dim=-1), torch.cat([joined_below, second], dim=-1)], dim=-2)
        size_now *= 2
    return inverse[..., 0, :size, :size]


def chunked_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       state: torch.Tensor | None = None, chunk: int = 64, final_state: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training form: within each chunk of `chunk` tokens as matrices (the WY/UT transform of the delta updates, one
    unit-triangular inverse), between chunks through the state. Only the state pass runs chunk by chunk; everything else is
    one batched product over all chunks. Any length: the last chunk is padded with tokens that neither decay nor write the
    state. Without `final_state` (training), the last chunk's write is skipped: None."""
    batch, heads, length, _ = k.shape
    per_channel = channelwise(g, k)
    pad = -length % chunk
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g = F.pad(g, (0, 0, 0, pad) if per_channel else (0, pad))
        beta = F.pad(beta, (0, pad))
    chunks = (length + pad) // chunk
    q, k, v = (x.reshape(batch, heads, chunks, chunk, x.shape[-1]) for x in (q, k, v))
    beta = beta.reshape(batch, heads, chunks, chunk, 1)
    G = g.reshape(batch, heads, chunks, chunk, *g.shape[3:]).cumsum(3)  # log decay from the chunk's start, inclusive
    k_beta = k * beta
    if per_channel:
        keys_keys, queries_keys = decayed_scores(torch.stack([k_beta, q]), k, G)  # keys_keys' diagonal is never read
        last = G[..., -1:, :]
        to_end = (last - G).exp()  # decay from each token to the chunk's end, per channel
        chunk_decay = last.exp().transpose(-1, -2)  # (..., d_k, 1)
        from_start = G.exp()
    else:
        upper = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).triu(1)
        pair_decay = (G[..., :, None] - G[..., None, :]).masked_fill(upper, float("-inf")).exp()
        keys_keys = (k_beta @ k.transpose(-1, -2)) * pair_decay
        queries_keys = (q @ k.transpose(-1, -2)) * pair_decay
        to_end = (G[..., -1:] - G).exp()[..., None]
        chunk_decay = G[..., -1:].exp()[..., None]  # (..., 1, 1)
        from_start = G.exp()[..., None]
    # the delta rule's writes in a chunk, past what the state entering it predicts: (I + strictly lower keys_keys)^-1 times
    # (beta v - beta k decayed from the chunk's start times that state)
    inverse = unit_lower_inverse(keys_keys)
    written = (k * to_end).transpose(-1, -2)
    S = starting_state(k, v, state)
    entering, fresh = [], []
    # unbind, not indexing: its backward stacks the chunks' gradients instead of adding each into a zero-filled whole
    for n, (inverse_n, values_n, keys_n, decay_n, written_n) in enumerate(
            zip(*(x.unbind(2) for x in (inverse, v * beta, k_beta * from_start, chunk_decay, written)))):
        entering.append(S)
        fresh.append(inverse_n @ (values_n - keys_n @ S))
        S = S * decay_n + written_n @ fresh[-1] if final_state or n < chunks - 1 else None
    # the queries read the state entering their chunk and the chunk's own writes: one product each over all chunks
    out = (q * from_start) @ torch.stack(entering, dim=2) + queries_keys @ torch.stack(fresh, dim=2)
    return out.reshape(batch, heads, chunks * chunk, -1)[:, :, :length], S


FORMS = {"chunked": chunked_delta_rule, "recurrent": recurrent_delta_rule, "naive": naive_delta_rule}


def vecdot_handle(inputs: list, outputs: list) -> int:
    """fvcore handle for torch.linalg.vecdot (the in-chunk scores' diagonal): d multiply-accumulates per output element."""
    return math.prod(traced_shape(outputs[0])) * traced_shape(inputs[0])[-1]


def init_decay(A_log: torch.Tensor, dt_bias: torch.Tensor) -> None:
    """Mamba-style decay init, as fla's layers: A ~ U(1, 16) as log A; dt ~ logU(1e-3, 0.1) floored at 1e-4, as softplus^-1(dt)."""
    A_log.copy_(torch.empty_like(A_log).uniform_(1, 16).log())
    dt = torch.empty_like(dt_bias).uniform_(math.log(1e-3), math.log(0.1)).exp().clamp_min(1e-4)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class Gates(NamedTuple):
    """A delta-rule mixer's per-token gates."""

    decay: torch.Tensor  # log decay, <= 0: (B, T, H), or (B, T, H, d_k) per channel
    beta: torch.Tensor  # write strength (B, T, H)
    output: torch.Tensor  # the output norm's gate (B, T, H, d_v)


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output (in fp32), then times act(gate): the output norm of gated DeltaNet and KDA."""

    def __init__(self, dim: int, eps: float, activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.eps, self.activation = eps, activation
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (self.weight * normed.to(x.dtype) * self.activation(gate.float())).to(x.dtype)


class DeltaRuleMixer(Component):
    """What gated DeltaNet and KDA share: the short convolution (SiLU) over [q | k | v], L2-normalised q and k (q scaled
    by d_k^-1/2), key heads shared by groups of value heads, the delta rule in any form, the gated output norm.

    A subclass builds `conv1d`, `o_norm` and `o_proj` and says how the input becomes [q | k | v] and the gates (`project`).
    """

    fixed_state = True

    def reset_parameters(self) -> None:
        init_decay(self.A_log, self.dt_bias)

    def param_roles(self) -> dict[str, str]:
        return {"A_log": VECTOR, "dt_bias": VECTOR}

    def setup(self, heads: int, key_heads: int, head_dim: int, value_dim: int, chunk: int) -> None:
        """Record the head layout and chunk size."""
        self.n_heads, self.key_heads, self.head_dim, self.value_dim, self.chunk = heads, key_heads, head_dim, value_dim, chunk
        self.key_width, self.value_width = key_heads * head_dim, heads * value_dim

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, Gates]:
        """[q | k | v] before the convolution (B, T, 2 key_width + value_width), and the gates."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x, "chunked")

    def mix(self, x: torch.Tensor, form: str = "chunked") -> torch.Tensor:
        """The mixer over a whole sequence with the delta rule in one of its `FORMS`."""
        rule = functools.partial(chunked_delta_rule, chunk=self.chunk, final_state=False) if form == "chunked" else FORMS[form]
        qkv, gates = self.project(x)
        return self.recur(F.silu(self.conv1d(qkv)), gates, rule, None)[0]

    def state(self, batch: int, capacity: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The convolution's last inputs and the delta-rule state (fp32, as the rule runs), whatever the capacity."""
        return {"conv": self.conv1d.state(batch, device, dtype),
                "recurrent": torch.zeros(batch, self.n_heads, self.head_dim, self.value_dim, device=device, dtype=torch.float32)}

    def decode(self, state: dict[str, torch.Tensor], start: int, x: torch.Tensor) -> torch.Tensor:
        # a prefill chunk in the chunked form from the carried state, a single token by the recurrence
        rule = functools.partial(chunked_delta_rule, chunk=self.chunk) if x.shape[1] > 1 else recurrent_delta_rule
        qkv, gates = self.project(x)
        out, recurrent = self.recur(F.silu(self.conv1d.decode(qkv, state["conv"])), gates, rule, state["recurrent"])
        state["recurrent"].copy_(recurrent)
        return out

    def recur(self, mixed: torch.Tensor, gates: Gates, rule: Callable, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The convolved [q | k | v] through the delta rule, the gated norm and the output projection; with the final state."""
        batch, length, _ = mixed.shape
        q, k, v = mixed.float().split([self.key_width, self.key_width, self.value_width], dim=-1)
        group = self.n_heads // self.key_heads
        q, k = (l2_normalize(t.view(batch, length, self.key_heads, self.head_dim)).repeat_interleave(group, dim=2) for t in (q, k))
        v = v.view(batch, length, self.n_heads, self.value_dim)
        out, state = rule(*(t.transpose(1, 2) for t in (q * self.head_dim ** -0.5, k, v, gates.decay.float(), gates.beta.float())),
                          state=state)
        out = self.o_norm(out.transpose(1, 2).to(mixed.dtype), gates.output)
        return self.o_proj(out.reshape(batch, length, self.value_width)), state

    def cache_elements(self, seq_len: int) -> int:
        """The delta-rule state and the convolution's past inputs: the same after any number of tokens."""
        return self.n_heads * self.head_dim * self.value_dim + self.conv1d.in_channels * (self.conv1d.span - 1)

    def flop_handles(self, seq_len: int) -> dict[str, Callable]:
        return {"aten::linalg_vecdot": vecdot_handle}

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, key_heads={self.key_heads}, head_dim={self.head_dim}, value_dim={self.value_dim}, chunk={self.chunk}"
