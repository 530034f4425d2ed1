"""Optimisers and learning-rate schedules for nanollm models.

AdamW alone, or Muon on the hidden matrices with AdamW on the rest (token embedding, LM head, norms,
biases): the split of modded-nanogpt and Moonlight. Weight decay applies to matrices only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .muon import Muon

if TYPE_CHECKING:
    from ..train.recipe import Recipe

__all__ = ["Muon", "ParamSplit", "split_params", "build_optimizers", "lr_multiplier"]

OUTER_MATRICES = ("embed.weight", "lm_head.weight")  # the vocabulary's matrices: AdamW, as Muon's authors advise


@dataclass
class ParamSplit:
    """A model's trainable parameters by the update rule they get."""

    hidden_matrices: dict[str, nn.Parameter]  # Muon's (with optimizer=muon)
    outer_matrices: dict[str, nn.Parameter]  # embedding and untied head: AdamW with weight decay
    vectors: dict[str, nn.Parameter]  # norms, biases, scalars: AdamW without weight decay


def split_params(model: nn.Module) -> ParamSplit:
    """Sort a nanollm model's parameters: hidden matrices (2-D or stacked), the vocabulary's matrices, the rest."""
    split = ParamSplit({}, {}, {})
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() < 2:
            split.vectors[name] = param
        elif name in OUTER_MATRICES:
            split.outer_matrices[name] = param
        else:
            split.hidden_matrices[name] = param
    return split


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """AdamW, fused where every parameter is a plain tensor (FSDP's DTensors take the foreach path)."""
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and not any(isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=None if fused else True)


def build_optimizers(model: nn.Module, recipe: Recipe) -> list[torch.optim.Optimizer]:
    """The recipe's optimisers over the model's parameters: [AdamW] or [Muon, AdamW]."""
    split = split_params(model)
    hidden = list(split.hidden_matrices.values())
    muon = recipe.optimizer == "muon"
    groups = [  # with Muon, AdamW keeps only the vocabulary's matrices and the vectors
        {"params": ([] if muon else hidden) + list(split.outer_matrices.values()), "weight_decay": recipe.weight_decay},
        {"params": list(split.vectors.values()), "weight_decay": 0.0},
    ]
    optimizers = [adamw(groups, recipe.lr, (recipe.beta1, recipe.beta2), recipe.eps)]
    if muon:
        optimizers.insert(0, Muon(hidden, lr=recipe.muon_lr, weight_decay=recipe.weight_decay, momentum=recipe.muon_momentum,
                                  nesterov=recipe.muon_nesterov, ns_steps=recipe.muon_ns_steps, adjust_lr_fn=recipe.muon_adjust_lr))
    return optimizers


def lr_multiplier(schedule: str, total: int, warmup_fraction: float, decay_fraction: float, final: float) -> Callable[[int], float]:
    """The learning rate of step `s` (0-based) as a share of the peak: linear warmup, then cosine or stable-decay."""
    warmup = round(warmup_fraction * total)
    decay_start = total - round(decay_fraction * total)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup - 1)
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start + 1) / (total - decay_start)
        return 1 - (1 - final) * min(1.0, progress)

    return multiplier
