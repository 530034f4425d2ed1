"""Hyperparameters that move with scale: the learning rate and batch size of a run from its compute.

`scaling_rule: constant` keeps the recipe's `lr` and `batch_size` at every budget. `deepseek` sets them from the
run's training compute C in FLOPs by DeepSeek LLM's fits (Bi et al. 2024, section 3.1):
eta_opt = 0.3118 C^-0.1250 and B_opt = 0.2920 C^0.3271 tokens, made a whole number of sequences (and of processes).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import RecipeError
from .recipe import Recipe

SCALING_RULES = ("constant", "deepseek")


def deepseek_lr(compute: float) -> float:
    """DeepSeek LLM's optimal peak learning rate at C FLOPs."""
    return 0.3118 * compute**-0.1250


def deepseek_batch_tokens(compute: float) -> float:
    """DeepSeek LLM's optimal batch size in tokens at C FLOPs."""
    return 0.2920 * compute**0.3271


def run_compute(recipe: Recipe, flops_per_token: float) -> float:
    """The compute a run is planned for, known before its batch size: its budget, or its tokens x FLOPs per token."""
    if recipe.budget is not None:
        return recipe.budget
    if recipe.tokens is not None:
        return recipe.tokens * flops_per_token
    raise RecipeError(f"recipe: scaling_rule {recipe.scaling_rule} sets the batch from the run's compute: give budget or tokens, not steps")


def scaled_recipe(recipe: Recipe, flops_per_token: float, seq_len: int, processes: int, previous: dict[str, Any] | None = None
                  ) -> tuple[Recipe, dict[str, Any]]:
    """The recipe with lr and batch_size set by its scaling rule, and what the rule chose (for the manifest).

    A resumed run keeps what the rule chose when it started (`previous`), whatever length it is given now.
    """
    if recipe.scaling_rule == "constant":
        return recipe, {"rule": "constant", "lr": recipe.lr, "batch_size": recipe.batch_size}
    if previous is not None and previous.get("rule") == recipe.scaling_rule:
        chosen = previous
    else:
        compute = run_compute(recipe, flops_per_token)
        batch_tokens = deepseek_batch_tokens(compute)
        sequences = max(processes, round(batch_tokens / seq_len / processes) * processes)
        chosen = {"rule": recipe.scaling_rule, "compute": compute, "lr": deepseek_lr(compute), "batch_tokens": batch_tokens, "batch_size": sequences}
    return dataclasses.replace(recipe, lr=chosen["lr"], batch_size=chosen["batch_size"]), chosen
