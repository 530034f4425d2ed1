"""Component registry: every mixer and FFN kind the language knows, one file each.

A component file defines an `nn.Module` subclass of `Component`, decorates it with
`@register(name, slot, *params)`, and implements its own accounting (active parameters,
KV-cache size, fvcore handles for ops fvcore cannot count). Importing this package imports
every component file below it, so adding a file is all it takes to extend the language.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..ir import ModelConfig

SLOTS = ("mixer", "ffn")
INIT_STD = 0.02  # normal init of every matrix, as GPT-2/Qwen3 use


@dataclass(frozen=True)
class Param:
    """One argument of a component call."""

    name: str
    type: type
    doc: str
    default: Any = None  # a value, a ModelConfig field name (str) for type int/float, or None = required
    minimum: float | None = None
    carry: bool = False  # a call leaving it out takes it from the nearest preceding call of the same component
    width: bool = False  # a hidden width: budget sizing keeps it a fixed multiple of d_model
    choices: tuple[str, ...] = ()  # for type str: the values it may take

    def default_for(self, config: ModelConfig) -> Any:
        """The value used when a call leaves this argument out (None if it is required)."""
        if isinstance(self.default, str) and self.type is not str:
            return getattr(config, self.default)
        return self.default


@dataclass(frozen=True)
class Spec:
    """What the language knows about a registered component."""

    name: str
    slot: str
    params: tuple[Param, ...]
    module: type[Component]
    doc: str


REGISTRY: dict[str, Spec] = {}


class Component(nn.Module):
    """Base class of registered components: default accounting for a dense, cache-free block.

    Subclasses are built as `Cls(config, **args)` and must name every argument in `extra_repr()`: the
    analysis reuses shapes and FLOP counts between calls whose repr and input shapes are equal.
    """

    spec: Spec
    returns_aux = False  # forward returns (output, weighted auxiliary loss)
    uses_rope = False  # forward takes (x, cos, sin)

    @classmethod
    def check(cls, config: ModelConfig, **args: Any) -> str | None:
        """A message if these arguments cannot work together with this config, else None."""
        return None

    def active_params(self) -> int:
        """Parameters one token uses."""
        return sum(p.numel() for p in self.parameters())

    def kv_cache_elements(self, seq_len: int) -> int:
        """Cached elements held for one sequence after `seq_len` tokens."""
        return 0

    def flop_handles(self, seq_len: int) -> dict[str, Callable]:
        """fvcore op handles (counting multiply-accumulates) for ops fvcore does not know."""
        return {}

    def finish_step(self) -> dict[str, torch.Tensor]:
        """Called by the trainer after each optimiser step.

        A component that accumulates training statistics in its forward passes (only while
        `collects_statistics(self)`) sums them over processes (`sum_over_processes`), updates any state
        that is not trained by gradients (e.g. MoE bias balancing), resets them, and returns the step's
        metrics: 0-d tensors are logged as scalars, 1-d tensors (e.g. per-expert load) as histograms and
        summed over the run for `summarize`. Most components have none.
        """
        return {}

    def summarize(self, totals: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
        """One row of the end-of-run table, from `finish_step`'s metrics summed over `steps` steps."""
        return {}


_recomputing = False  # True while activation checkpointing re-runs a forward pass during backward


def collects_statistics(module: nn.Module) -> bool:
    """Whether this forward pass adds to training statistics: training, and not a checkpoint recompute."""
    return module.training and not _recomputing


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Marks an activation-checkpoint recompute, so statistics are not counted twice."""
    global _recomputing
    previous, _recomputing = _recomputing, True
    try:
        yield
    finally:
        _recomputing = previous


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor: this one summed over all training processes (a copy when not distributed)."""
    total = tensor.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return total


def register(name: str, slot: str, *params: Param) -> Callable[[type[Component]], type[Component]]:
    """Class decorator: make a Component callable from the language as `name(...)`."""
    assert slot in SLOTS, slot

    def decorate(cls: type[Component]) -> type[Component]:
        assert name not in REGISTRY, f"component {name!r} registered twice"
        cls.spec = Spec(name, slot, params, cls, (cls.__doc__ or "").strip().splitlines()[0])
        REGISTRY[name] = cls.spec
        return cls

    return decorate


for _module in pkgutil.walk_packages(__path__, __name__ + "."):
    importlib.import_module(_module.name)
