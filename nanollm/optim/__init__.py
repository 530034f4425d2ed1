"""Optimisers and learning-rate schedules for nanollm models.

AdamW alone, or Muon on the hidden matrices with AdamW on the rest (token embedding, LM head, other lookup
tables, norms, biases): the split of modded-nanogpt and Moonlight. Each parameter's role is the module's
own word for it (`components.param_roles`). Weight decay applies to matrices and tables only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..components import MATRIX, TABLE, param_roles
from .muon import Muon

__all__ = ["Muon", "OptimizerSettings", "ParamSplit", "split_params", "build_optimizers", "lr_multiplier"]


@dataclass(frozen=True)
class OptimizerSettings:
    """What the optimisers need to know: the rule, and its hyperparameters."""

    optimizer: str  # "adamw" or "muon"
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    muon_lr: float
    muon_momentum: float
    muon_nesterov: bool
    muon_ns_steps: int
    muon_adjust_lr: str


@dataclass
class ParamSplit:
    """A model's trainable parameters by the update rule they get."""

    hidden_matrices: dict[str, nn.Parameter]  # Muon's (with optimizer=muon)
    tables: dict[str, nn.Parameter]  # embeddings, an untied head, other lookup tables: AdamW with weight decay
    vectors: dict[str, nn.Parameter]  # norms, biases, scalars: AdamW without weight decay


def split_params(model: nn.Module) -> ParamSplit:
    """Sort a nanollm model's trainable parameters by the role each module gives its own."""
    split = ParamSplit({}, {}, {})
    groups = {MATRIX: split.hidden_matrices, TABLE: split.tables}
    for prefix, module in model.named_modules():
        roles = param_roles(module)
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                groups.get(roles[name], split.vectors)[f"{prefix}.{name}" if prefix else name] = param
    return split


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """AdamW, fused where every parameter is a plain tensor (FSDP's DTensors take the foreach path)."""
    # Imported here, not with the module: DTensor would cost half a second of every command line's start.
    from torch.distributed.tensor import DTensor

    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and not any(isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=None if fused else True)


def build_optimizers(model: nn.Module, settings: OptimizerSettings) -> list[torch.optim.Optimizer]:
    """The optimisers over the model's parameters: [AdamW] or [Muon, AdamW]."""
    split = split_params(model)
    hidden = list(split.hidden_matrices.values())
    muon = settings.optimizer == "muon"
    groups = [  # with Muon, AdamW keeps only the tables and the vectors
        {"params": ([] if muon else hidden) + list(split.tables.values()), "weight_decay": settings.weight_decay},
        {"params": list(split.vectors.values()), "weight_decay": 0.0},
    ]
    optimizers = [adamw(groups, settings.lr, (settings.beta1, settings.beta2), settings.eps)]
    if muon:
        optimizers.insert(0, Muon(hidden, lr=settings.muon_lr, weight_decay=settings.weight_decay, momentum=settings.muon_momentum,
                                  nesterov=settings.muon_nesterov, ns_steps=settings.muon_ns_steps, adjust_lr_fn=settings.muon_adjust_lr))
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
