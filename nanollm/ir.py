"""The typed intermediate representation: model settings and the flat list of layers, each an ordered list of
sublayers joined to the residual stream by a residual scheme."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Iterator

FORMAT = 2  # of `arch_to_json`; 1 (before sublayers and call-valued settings) is still read


def setting(default: Any, doc: str, minimum: float | None = None, maximum: float | None = None,
            choices: tuple[str, ...] = (), aliases: dict[str, str] | None = None, kind: str | None = None) -> Any:
    """A ModelConfig field carrying its documentation, range, choices (str; `aliases` are other words for some)
    or component kind (Call)."""
    metadata = {"doc": doc, "minimum": minimum, "maximum": maximum, "choices": choices, "aliases": aliases or {}, "kind": kind}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Call:
    """A resolved component call: its registered name and every argument, defaults filled in (a value may be a Call)."""

    name: str
    args: tuple[tuple[str, Any], ...] = ()

    def kwargs(self) -> dict[str, Any]:
        """The arguments as a dict."""
        return dict(self.args)

    def __str__(self) -> str:
        return self.brief({})

    def brief(self, defaults: dict[str, Any]) -> str:
        """Source form, leaving out arguments whose value equals the given defaults."""
        shown = [f"{k}={format_value(v)}" for k, v in self.args if k not in defaults or defaults[k] != v]
        return f"{self.name}({', '.join(shown)})" if shown else self.name


QK_NORMS = ("head", "projection", "none")
MAX_WIDTH = 1 << 20  # any width, head count or hidden size: past every real model, and products stay within int64


@dataclass(frozen=True)
class ModelConfig:
    """Model-wide settings. Defaults are Qwen3-0.6B's.

    Call-valued settings (`rope`, `norm`, `residual`) are completed on construction: arguments left out take
    their registered defaults, so two configs that mean the same model are equal.
    """

    vocab_size: int = setting(151936, "vocabulary size", 1, 1 << 24)
    d_model: int = setting(1024, "residual stream width", 1, MAX_WIDTH)
    n_layers: int = setting(28, "layer count; only needed when the file has no layer list", 1)
    n_heads: int = setting(16, "query heads per attention layer", 1, MAX_WIDTH)
    n_kv_heads: int = setting(8, "key/value heads (GQA); equal to n_heads is MHA", 1, MAX_WIDTH)
    head_dim: int = setting(128, "width of one attention head", 1, MAX_WIDTH)
    d_ff: int = setting(3072, "SwiGLU hidden width, also the default expert width", 1, MAX_WIDTH)
    norm_eps: float = setting(1e-6, "norm epsilon", 0)
    qk_norm: str = setting("head", "norm on queries and keys before RoPE: head (each head, Qwen3), projection (the whole "
                                   "q and k projections, OLMo 2/3) or none; true and false mean head and none",
                           choices=QK_NORMS, aliases={"true": "head", "false": "none"})
    rope_theta: float = setting(1e6, "RoPE base frequency (the default `theta` of `rope` and `yarn`)", 1)
    rope: Call = setting(Call("rope"), "position encoding of attention layers: rope(...), yarn(...) or nope", kind="position")
    norm: Call = setting(Call("rmsnorm"), "kind of every norm layer: rmsnorm, or rmsnorm(zero_centered=true) (Gemma's 1 + w)", kind="norm")
    residual: Call = setting(Call("prenorm"), "residual scheme: prenorm, postnorm (OLMo 2/3) or sandwich (Gemma 2/3)", kind="residual")
    attn_scale: float = setting(0.0, "attention logit scale; 0 is 1/sqrt(head_dim) (Gemma 3: query_pre_attn_scalar^-1/2)", 0)
    attn_softcap: float = setting(0.0, "attention logit soft-cap c: c tanh(s / c); 0 is off (Gemma 2)", 0)
    logit_softcap: float = setting(0.0, "final logit soft-cap c: c tanh(z / c); 0 is off (Gemma 2)", 0)
    embed_scale: bool = setting(False, "multiply the token embeddings by sqrt(d_model) (Gemma)")
    tie_embeddings: bool = setting(True, "LM head shares the token embedding matrix")
    seq_len: int = setting(4096, "training context length; the default length for analysis", 1, 1 << 24)

    def __post_init__(self) -> None:
        from .components import complete  # the registry imports this module; completing needs it

        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) and f.metadata["aliases"]:  # qk_norm was a bool before it had a choice of scope
                object.__setattr__(self, f.name, f.metadata["aliases"][format_value(value)])
            if f.metadata["kind"]:
                object.__setattr__(self, f.name, complete(value, f.metadata["kind"], self))

    @classmethod
    def setting_names(cls) -> list[str]:
        """Names of all settings, in declaration order."""
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class Layer:
    """One block: its sublayers in slot order (slot, call), each entered from and left to the residual stream by
    the layer's residual scheme."""

    sublayers: tuple[tuple[str, Call], ...]
    residual: Call

    def get(self, slot: str) -> Call | None:
        """The call in a slot, or None if the layer has no such sublayer."""
        return dict(self.sublayers).get(slot)

    @property
    def mixer(self) -> Call | None:
        return self.get("mixer")

    @property
    def ffn(self) -> Call | None:
        return self.get("ffn")

    def calls(self) -> Iterator[Call]:
        """The sublayers' calls, in order."""
        return (call for _, call in self.sublayers)


@dataclass(frozen=True)
class Group:
    """A `repeat count < body >` group as written; its repetitions are layers[start:stop]."""

    count: int
    start: int
    stop: int
    body: tuple[int | Group, ...]  # the first repetition: layer indices and nested groups


@dataclass(frozen=True)
class Arch:
    """A whole model: settings plus the expanded layer list."""

    config: ModelConfig
    layers: tuple[Layer, ...]
    # The layer list as written (layer indices and repeat groups), for diagrams. Not part of the model's
    # identity: the same layers written differently, or read from a transformers config (no outline), are equal.
    outline: tuple[int | Group, ...] = field(default=(), compare=False)


def format_value(value: Any) -> str:
    """Canonical source text of a setting or argument value (a call with the arguments it was given)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text if ("e" in text or "." in text) else text + ".0"
    return str(value)  # an int, a name, or a call (with the arguments it holds)


def fold(layers: tuple[Layer, ...], start: int = 0, stop: int | None = None, max_period: int = 64) -> tuple[int | Group, ...]:
    """An outline of layers[start:stop] as repeat groups where it repeats (for a list read from a transformers config,
    or written out layer by layer).

    Greedy from the front: at each position, the repeating pattern covering the most layers; the pattern's
    first repetition is folded the same way, so Gemma 3's 5 local : 1 global is `repeat 4 < repeat 5 < .. >; .. >`.
    """

    def run(start: int, stop: int) -> tuple[int | Group, ...]:
        items: list[int | Group] = []
        i = start
        while i < stop:
            period, count = 1, 1
            for p in range(1, min(max_period, (stop - i) // 2) + 1):
                c = 1
                while i + (c + 1) * p <= stop and layers[i + c * p:i + (c + 1) * p] == layers[i:i + p]:
                    c += 1
                if c > 1 and p * c > period * count:
                    period, count = p, c
            if count == 1:
                items.append(i)
            else:
                items.append(Group(count, i, i + period * count, run(i, i + period)))
            i += period * count
        return tuple(items)

    return run(start, len(layers) if stop is None else stop)


# ---- plain data --------------------------------------------------------------------------------------


def value_to_json(value: Any) -> Any:
    """A setting or argument as JSON: a call is {"name", "args"}."""
    if isinstance(value, Call):
        return {"name": value.name, "args": {k: value_to_json(v) for k, v in value.args}}
    return value


def value_from_json(value: Any) -> Any:
    """The inverse of `value_to_json`."""
    if isinstance(value, dict):
        return Call(value["name"], tuple((k, value_from_json(v)) for k, v in value["args"].items()))
    return value


def arch_to_json(arch: Arch) -> dict[str, Any]:
    """The IR as plain data: settings, and each layer's residual scheme and sublayer calls with every argument."""
    return {
        "format": FORMAT,
        "config": {f.name: value_to_json(getattr(arch.config, f.name)) for f in fields(arch.config)},
        "layers": [
            {"residual": value_to_json(layer.residual), "sublayers": {slot: value_to_json(call) for slot, call in layer.sublayers}}
            for layer in arch.layers
        ],
    }


def arch_from_json(data: dict[str, Any]) -> Arch:
    """The IR back from `arch_to_json`'s plain data, of this format or the first (every layer `mixer` + `ffn`, pre-norm)."""
    known = {f.name for f in fields(ModelConfig)}
    config = ModelConfig(**{k: value_from_json(v) for k, v in data["config"].items() if k in known})
    if data.get("format", 1) == 1:
        layers = tuple(
            Layer(tuple((slot, value_from_json(layer[slot])) for slot in ("mixer", "ffn")), config.residual) for layer in data["layers"]
        )
    else:
        layers = tuple(
            Layer(tuple((slot, value_from_json(call)) for slot, call in layer["sublayers"].items()), value_from_json(layer["residual"]))
            for layer in data["layers"]
        )
    return Arch(config, tuple(complete_layer(layer, config) for layer in layers))


def complete_layer(layer: Layer, config: ModelConfig) -> Layer:
    """A layer whose calls have every argument: those added since it was written take their defaults."""
    from .components import complete

    sublayers = tuple((slot, complete(call, slot, config)) for slot, call in layer.sublayers)
    return Layer(sublayers, complete(layer.residual, "residual", config))
