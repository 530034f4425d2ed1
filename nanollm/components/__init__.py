"""Component registry: every sublayer, residual scheme, norm and position encoding the language knows, one file each.

A component file defines a class, decorates it with `@register(name, kind, *params)`, and owns everything
outward about it: its module, its language entry (the `Param`s), its accounting, how diagrams describe it,
the optimiser role of each parameter, and its transformers weight names. Importing this package imports
every file below it; a class registered anywhere else (a test, a user's script) is just as known.

Kinds:
- sublayers, one per slot of a layer (`SLOTS`, in layer order): `memory` (usually empty), `mixer` and `ffn`. `Component` subclasses,
  built as `cls(config, **args)`. A component declares what its forward takes (`inputs()`: the branch input
  first, then tables from the vocabulary below) and returns (`outputs`).
- `residual`: how sublayers read from and write to the residual stream (`Residual` subclasses).
- `norm`: norm layers, built as `cls(dim, eps, **args)`.
- `position`: position encodings of attention, built as `cls(head_dim, **args)`: the module computing the
  rotary tables, which the attention that declared them applies.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import fx, nn

from ..errors import ArchError
from ..ir import Call, ModelConfig, format_value

if TYPE_CHECKING:
    from ..compiler import Lowering, Site

# A layer's sublayer slots, in the order a layer runs them, and the component a layer gets where it names none.
# A slot whose default is None is empty in a layer that names nothing for it.
SLOTS = {"memory": None, "mixer": "global", "ffn": "swiglu"}
KINDS = {"memory": "a memory", "mixer": "a mixer", "ffn": "an ffn", "residual": "a residual scheme", "norm": "a norm", "position": "a position encoding"}
INIT_STD = 0.02  # normal init of every matrix, as GPT-2/Qwen3 use


@dataclass(frozen=True)
class Param:
    """One argument of a component call."""

    name: str
    type: type  # int, float, bool, str, or Call (a call of component kind `kind`)
    doc: str
    default: Any = None  # the value a call leaving it out gets; None: required (unless `setting` is given)
    setting: str | None = None  # the model setting it defaults to instead (a per-call override of that setting)
    minimum: float | None = None
    maximum: float | None = None
    carry: bool = False  # a call leaving it out takes it from the nearest preceding call of the same component
    width: bool = False  # a hidden width: budget sizing keeps it a fixed multiple of d_model
    choices: tuple[str, ...] = ()  # for type str: the values it may take
    kind: str | None = None  # for type Call: the component kind it names
    positional: bool = True  # may be given without its name (in declaration order)

    def default_for(self, config: ModelConfig) -> Any:
        """The value used when a call leaves this argument out (None if it is required)."""
        return getattr(config, self.setting) if self.setting else self.default


@dataclass(frozen=True)
class Spec:
    """What the language knows about a registered component."""

    name: str
    kind: str
    params: tuple[Param, ...]
    module: type
    doc: str


REGISTRY: dict[str, Spec] = {}


def register(name: str, kind: str, *params: Param) -> Callable[[type], type]:
    """Class decorator: make a class callable from the language as `name(...)`, a component of `kind`."""
    assert kind in KINDS, kind

    def decorate(cls: type) -> type:
        assert name not in REGISTRY, f"component {name!r} registered twice"
        cls.spec = Spec(name, kind, params, cls, (cls.__doc__ or "").strip().splitlines()[0])
        REGISTRY[name] = cls.spec
        return cls

    return decorate


def complete(call: Call, kind: str, config: ModelConfig) -> Call:
    """A call with every argument: those left out take their defaults, nested calls are completed too; checked."""
    spec = REGISTRY.get(call.name)
    if spec is None or spec.kind != kind:
        raise ArchError(f"'{call.name}' is not {KINDS[kind]}" if spec else f"unknown {kind} '{call.name}'")
    given = call.kwargs()
    unknown = set(given) - {p.name for p in spec.params}
    if unknown:
        raise ArchError(f"{call.name} has no argument '{sorted(unknown)[0]}'")
    args = {}
    for param in spec.params:
        value = given[param.name] if param.name in given else param.default_for(config)
        if value is None:
            raise ArchError(f"{call.name} needs argument '{param.name}' ({param.doc})")
        args[param.name] = complete(value, param.kind, config) if param.type is Call else value
    problem = spec.module.check(config, **args)
    if problem:
        raise ArchError(f"{call.name}: {problem}")
    return Call(call.name, tuple(args.items()))


def written_args(call: Call, config: ModelConfig, also: Callable[[Param], bool] = lambda param: False) -> list[tuple[str, Any]]:
    """The arguments a user writes: those not at their defaults, carried ones always (a bare call would take the
    value of the one before it), and those `also` picks."""
    params = {p.name: p for p in REGISTRY[call.name].params}
    return [(name, value) for name, value in call.args
            if params[name].carry or also(params[name]) or value != params[name].default_for(config)]


def argument_text(args: list[tuple[str, Any]], config: ModelConfig) -> str:
    """`name=value, ...`, nested calls written as `brief` writes them."""
    return ", ".join(f"{name}={brief(value, config) if isinstance(value, Call) else format_value(value)}" for name, value in args)


def brief(call: Call, config: ModelConfig) -> str:
    """A call as a user would write it (`written_args`), nested calls likewise."""
    shown = argument_text(written_args(call, config), config)
    return f"{call.name}({shown})" if shown else call.name


def telling(call: Call, config: ModelConfig, always: tuple[str, ...] = ()) -> str:
    """The arguments a diagram shows under a component's name: what a user writes, sizes, and `always`."""
    return argument_text(written_args(call, config, lambda param: param.width or param.name in always), config)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    """A norm of the model's kind (its `norm` setting) over `dim` channels, with its `norm_eps`."""
    return REGISTRY[config.norm.name].module(dim, config.norm_eps, **config.norm.kwargs())


def norm_label(config: ModelConfig) -> str:
    """The model's norm kind as diagrams name it."""
    return REGISTRY[config.norm.name].module.label(config.norm)


# ---- what a sublayer's forward takes --------------------------------------------------------------------

BRANCH = "x"  # the sublayer's input, as the residual scheme hands it over (always first)
TOKEN_IDS = "token_ids"  # the model's input ids, (B, T)
POSITIONS = "positions"  # the tokens' positions, (T,)


@dataclass(frozen=True)
class Rotary:
    """The cos and sin tables (two arguments) of a position encoding for heads of a width; layers asking for the
    same encoding at the same width share one table."""

    position: Call
    head_dim: int


Input = str | Rotary

# ---- optimiser roles --------------------------------------------------------------------------------------

MATRIX = "matrix"  # a hidden weight matrix (or a stack of them): Muon's, or AdamW with weight decay
TABLE = "table"  # a lookup table or the vocabulary projection: AdamW with weight decay, never Muon
VECTOR = "vector"  # norm scales, biases, scalars: AdamW without weight decay


def param_roles(module: nn.Module) -> dict[str, str]:
    """The optimiser role of each of a module's own parameters (not its children's).

    A module says so itself (`param_roles()`); otherwise an embedding's table is TABLE, any other parameter of
    two or more dimensions MATRIX, the rest VECTOR.
    """
    if hasattr(module, "param_roles"):
        return module.param_roles()
    if isinstance(module, nn.Embedding):
        return {name: TABLE for name, _ in module.named_parameters(recurse=False)}
    return {name: MATRIX if p.dim() >= 2 else VECTOR for name, p in module.named_parameters(recurse=False)}


# ---- sublayers ---------------------------------------------------------------------------------------------


class Registered:
    """What every registered class answers: whether arguments work together, and how diagrams describe a call."""

    spec: Spec

    @classmethod
    def check(cls, config: ModelConfig, **args: Any) -> str | None:
        """A message if these arguments cannot work together with this config, else None."""
        return None

    @classmethod
    def describe(cls, call: Call, config: ModelConfig) -> list[str]:
        """The lines a diagram shows under the component's name."""
        shown = telling(call, config)
        return [shown] if shown else []


class Component(Registered, nn.Module):
    """Base class of sublayer components: default accounting for a dense, cache-free block.

    Built as `cls(config, **args)` with every argument of its call. `forward` takes what `inputs()` lists
    (a Rotary as two tensors, cos and sin) and returns the output, or a tuple in the order of `outputs`.
    """

    outputs: tuple[str, ...] = ("out",)  # or ("out", "aux_loss"): a weighted auxiliary loss the model sums
    # True: `cache_elements` is a recurrent state of a fixed size (a linear mixer's matrices, a convolution's last
    # inputs), reported per sequence beside the KV cache per token
    fixed_state = False
    hf_module = ""  # the transformers decoder layer's submodule it corresponds to (self_attn, mlp, ...)

    def inputs(self) -> tuple[Input, ...]:
        """What forward takes, in order: the branch input, then tables from the vocabulary above."""
        return (BRANCH,)

    def active_params(self) -> int:
        """Parameters one token uses."""
        return sum(p.numel() for p in self.parameters())

    def memory_params(self) -> int:
        """Parameters that are lookup memory rather than compute (tables a token reads a few rows of)."""
        return 0

    def cache_elements(self, seq_len: int) -> int:
        """Elements of inference state held for one sequence after `seq_len` tokens (keys and values, or a recurrent state)."""
        return 0

    def flop_handles(self, seq_len: int) -> dict[str, Callable]:
        """fvcore op handles (counting multiply-accumulates) for ops fvcore does not know."""
        return {}

    # ---- decoding (nanollm/decode.py): the one method pair a component implements to generate token by token ----

    def state(self, batch: int, capacity: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """The inference state of `batch` sequences of up to `capacity` tokens, as tensors `decode` updates in place
        (keys and values, a ring buffer, a recurrent state), or None: the output at a position depends on that
        position alone (an FFN, an MoE), and the component decodes by its forward. A mixer must declare its state."""
        if self.spec.kind != "ffn":  # a mixer or a memory reads earlier tokens: it must say how it keeps them
            raise NotImplementedError(f"{self.spec.name} cannot decode incrementally yet: it implements no state() and decode()")
        return None

    def decode(self, state: dict[str, torch.Tensor], start: int, *inputs: torch.Tensor) -> Any:
        """forward for the T >= 1 new tokens at positions start..start+T-1 (continuing where `state` stops), the
        earlier tokens seen only through `state`, which it updates in place; `inputs` as forward takes them
        (`inputs()`: rotary tables and POSITIONS are those of the new tokens)."""
        raise NotImplementedError(f"{self.spec.name} declares a state but implements no decode()")

    def hf_weights(self) -> dict[str, str]:
        """Parameter (and persistent buffer) names: ours -> transformers', both relative to this module."""
        return {}

    def hf_names(self) -> dict[str, str]:
        """`hf_weights` with transformers' side relative to the decoder layer."""
        return {ours: f"{self.hf_module}.{theirs}" for ours, theirs in self.hf_weights().items()}

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


# ---- residual schemes -------------------------------------------------------------------------------------


class Residual(Registered):
    """Base class of residual schemes: how each sublayer's site reads its input from the residual stream and
    writes its output back (in the shape of lucidrains' hyper-connections: expand, enter/leave per site, reduce).

    Built as `cls(config, **args)` per distinct call. Lowering asks it for the modules of each site (added to
    the layer as `<slot>_<part>`) and lets it emit the graph nodes of entering and leaving; `expand` and `reduce`
    turn the embedding into the stream and the stream back into one hidden state before the final norm.
    """

    streams = 1  # residual streams the scheme keeps; layers may mix schemes only of the same count
    formula = ""  # one line for diagrams, in terms of h (the stream), f (the sublayer) and norm

    def __init__(self, config: ModelConfig, **args: Any) -> None:
        self.config = config

    @classmethod
    def describe(cls, call: Call, config: ModelConfig) -> list[str]:
        """The scheme's formula, then its telling arguments."""
        return [cls.formula, *super().describe(call, config)]

    def site_modules(self, site: Site) -> dict[str, nn.Module]:
        """The modules of one sublayer's site (`site.layer`, `site.slot`), by part name (`norm`, `post_norm`, ...)."""
        return {}

    def model_modules(self) -> dict[str, nn.Module]:
        """Modules of the whole model (not of a site) that `expand` or `reduce` call, by name (e.g. a learned stream head)."""
        return {}

    def enter(self, g: Lowering, site: Site, stream: fx.Node) -> fx.Node:
        """Emit the nodes giving the sublayer's input; returns it."""
        raise NotImplementedError

    def leave(self, g: Lowering, site: Site, stream: fx.Node, out: fx.Node) -> fx.Node:
        """Emit the nodes writing the sublayer's output back; returns the new stream."""
        raise NotImplementedError

    def expand(self, g: Lowering, hidden: fx.Node) -> fx.Node:
        """The stream made from the embedding."""
        return hidden

    def reduce(self, g: Lowering, stream: fx.Node) -> fx.Node:
        """The hidden state the final norm takes, from the stream."""
        return stream

    def picture(self, slot: str) -> tuple[list[str], list[str]]:
        """What a diagram draws on a sublayer's branch: the parts before the component and after it, by part name."""
        return [], []

    def hf_names(self, slot: str) -> dict[str, str]:
        """A site's part names -> the transformers decoder layer's module names (e.g. norm -> input_layernorm)."""
        return {}

    def hf_model_names(self) -> dict[str, str]:
        """Parameter names of `model_modules` (`hc_head.fn`) -> transformers', relative to the decoder (`hc_head.hc_fn`)."""
        return {}


# ---- training statistics ------------------------------------------------------------------------------------

_recomputing = False  # True while activation checkpointing re-runs a forward pass during backward


def traced_shape(value: torch.Value) -> list[int]:
    """The shape of a value of a torch.jit trace: what a `flop_handles` handle reads its inputs' shapes from."""
    return value.type().sizes()


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


def distributed() -> bool:
    """Whether several processes train together."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor: this one summed over all training processes (a copy when not distributed)."""
    total = tensor.clone()
    if distributed():
        dist.all_reduce(total)
    return total


for _module in pkgutil.walk_packages(__path__, __name__ + "."):
    importlib.import_module(_module.name)
