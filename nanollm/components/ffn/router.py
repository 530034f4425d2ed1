"""Token-choice top-k routing for the MoE: scores, group-limited selection, selection bias, router losses.

Four scoring functions: softmax over all experts (Switch, Mixtral, Qwen3-MoE), an independent sigmoid
per expert (DeepSeek-V3), an independent sqrt(softplus) per expert (DeepSeek-V4), or the top-k chosen on the
logits and softmax over those k only (GPT-OSS, whose router logits also have a bias). Experts are chosen by score
(plus DeepSeek-V3's selection bias when balancing by bias, which never enters the weights), optionally only among
the best groups of experts (DeepSeek-V3's group-limited routing), or by a fixed table of k experts per token id
(hash routing: DeepSeek-V4's first layers, after Roller et al., "Hash Layers"); the chosen scores, optionally
renormalised and scaled, weight the experts' outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import INIT_STD

ROUTERS = ("softmax", "sigmoid", "sqrt_softplus", "topk_softmax")
PER_EXPERT = ("sigmoid", "sqrt_softplus")  # scorings of each expert on its own (not a distribution over experts)
BALANCES = ("aux", "seq_aux", "none", "bias")


@dataclass
class Routing:
    """One forward pass's routing of N tokens: k experts each, their weights, and the weighted losses."""

    experts: torch.Tensor  # (N, k) expert ids
    weights: torch.Tensor  # (N, k) fp32 weights of those experts' outputs
    balance_loss: torch.Tensor  # coefficient-weighted load-balancing loss (0-d)
    z_loss: torch.Tensor  # coefficient-weighted router z-loss (0-d)


class Router(nn.Module):
    """Scores every expert for every token and picks each token's top k."""

    def __init__(
        self,
        d_model: int,
        experts: int,
        top: int,
        balance: str,
        router: str,
        norm_topk: bool,
        scale: float,
        groups: int,
        top_groups: int,
        aux: float,
        z_loss: float,
        jitter: float,
        router_bias: bool = False,
        hash: bool = False,
        vocab_size: int = 0,
    ) -> None:
        super().__init__()
        self.experts, self.top, self.kind, self.norm_topk, self.scale = experts, top, router, norm_topk, scale
        self.groups, self.top_groups, self.balance, self.aux, self.z_coef, self.jitter = groups, top_groups, balance, aux, z_loss, jitter
        self.weight = nn.Parameter(torch.empty(experts, d_model))
        self.bias = nn.Parameter(torch.zeros(experts)) if router_bias else None
        # Hash routing: each token id's k experts, fixed (a persistent buffer: checkpointed, never trained)
        self.register_buffer("token_experts", torch.zeros(vocab_size, top, dtype=torch.long) if hash else None)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.token_experts is not None:  # k distinct experts per token id, uniformly at random
            draws = torch.rand(self.token_experts.shape[0], self.experts, device=self.token_experts.device)
            self.token_experts.copy_(draws.topk(self.top, dim=-1).indices)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Each expert's affinity to each token, from the router logits (N, E)."""
        if self.kind == "sigmoid":
            return logits.sigmoid()
        if self.kind == "sqrt_softplus":
            return F.softplus(logits).sqrt()
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor, selection_bias: torch.Tensor | None = None, token_ids: torch.Tensor | None = None) -> Routing:
        """Route x of shape (B, T, d) (sequences matter only to the sequence-wise balance loss); hash routing reads
        the tokens' ids (B, T)."""
        if self.training and self.jitter > 0:  # Switch Transformer: multiplicative noise on the router input only
            x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
        logits = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias).float()
        scores = self.scores(logits)
        # topk_softmax chooses on the logits (softmax ties where it underflows) and weights by a softmax over the k
        ranked = logits if self.kind == "topk_softmax" else scores
        if self.token_experts is not None:
            experts = self.token_experts[token_ids.reshape(-1)]
        else:
            experts = self.select(ranked.detach(), selection_bias)
        weights = logits.gather(1, experts).softmax(dim=-1) if self.kind == "topk_softmax" else scores.gather(1, experts)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # the epsilon guards all-zero sigmoids
        weights = weights * self.scale
        balance = self.balance_loss(scores.view(x.shape[0], -1, self.experts), experts.view(x.shape[0], -1))
        z_loss = self.z_coef * logits.logsumexp(dim=-1).square().mean() if self.z_coef > 0 else logits.new_zeros(())
        return Routing(experts, weights, balance, z_loss)

    def select(self, scores: torch.Tensor, selection_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Each token's top-k expert ids (N, k), by score plus selection bias, within its best groups."""
        if selection_bias is not None:
            scores = scores + selection_bias
        if self.groups > 1:
            grouped = scores.view(scores.shape[0], self.groups, -1)
            # DeepSeek-V3: a group scores the sum of its two best experts; keep the best top_groups groups.
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
            kept = group_scores.topk(self.top_groups, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, kept, torch.ones_like(kept, dtype=torch.bool))
            scores = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(scores)
        return scores.topk(self.top, dim=-1).indices

    def balance_loss(self, scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The weighted balance loss from router scores (B, T, E) and choices (B, T*k).

        aux (Switch/GShard): aux * E * sum_i f_i P_i over all tokens, f_i = assignments to i per token,
        P_i = mean affinity. seq_aux (DeepSeek-V2/V3): aux * sum_i f_i P_i per sequence, with
        f_i = E / (k T) * assignments to i in the sequence, averaged over sequences.
        """
        if self.balance not in ("aux", "seq_aux") or self.aux == 0:
            return scores.new_zeros(())
        # Affinities as a distribution over experts: softmax already is one; sigmoid scores are normalised.
        affinity = scores / scores.sum(dim=-1, keepdim=True) if self.kind in PER_EXPERT else scores
        batch, length, _ = affinity.shape
        counts = torch.zeros(batch, self.experts, device=affinity.device).scatter_add_(1, experts, torch.ones_like(experts, dtype=torch.float))
        if self.balance == "aux":
            fraction = counts.sum(dim=0) / (batch * length)
            return self.aux * self.experts * (fraction * affinity.mean(dim=(0, 1))).sum()
        fraction = counts * self.experts / (self.top * length)
        return self.aux * (fraction * affinity.mean(dim=1)).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"experts={self.experts}, top={self.top}, kind={self.kind}" + (", hash" if self.token_experts is not None else "")
