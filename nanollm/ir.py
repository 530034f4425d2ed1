"""The typed intermediate representation: model settings and the flat list of layers."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def setting(default: Any, doc: str, minimum: float | None = None) -> Any:
    """A ModelConfig field carrying its documentation and lower bound."""
    return field(default=default, metadata={"doc": doc, "minimum": minimum})


@dataclass(frozen=True)
class ModelConfig:
    """Model-wide settings. Defaults are Qwen3-0.6B's."""

    vocab_size: int = setting(151936, "vocabulary size", 1)
    d_model: int = setting(1024, "residual stream width", 1)
    n_layers: int = setting(28, "layer count; only needed when the file has no layer list", 1)
    n_heads: int = setting(16, "query heads per attention layer", 1)
    n_kv_heads: int = setting(8, "key/value heads (GQA); equal to n_heads is MHA", 1)
    head_dim: int = setting(128, "width of one attention head", 1)
    d_ff: int = setting(3072, "SwiGLU hidden width, also the default expert width", 1)
    norm_eps: float = setting(1e-6, "RMSNorm epsilon", 0)
    qk_norm: bool = setting(True, "RMSNorm on each query and key head before RoPE")
    rope_theta: float = setting(1e6, "RoPE base frequency", 1)
    tie_embeddings: bool = setting(True, "LM head shares the token embedding matrix")
    seq_len: int = setting(4096, "training context length; the default length for analysis", 1)

    @classmethod
    def setting_names(cls) -> list[str]:
        """Names of all settings, in declaration order."""
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class Call:
    """A resolved component call: its registered name and every argument, defaults filled in."""

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


@dataclass(frozen=True)
class Layer:
    """One block: pre-norm token mixer and pre-norm feed-forward, each with a residual add."""

    mixer: Call
    ffn: Call


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
    """Canonical source text of a setting or argument value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text if ("e" in text or "." in text) else text + ".0"
    if isinstance(value, str):
        return value
    return str(value)


def arch_to_json(arch: Arch) -> dict[str, Any]:
    """The IR as plain data: settings, and each layer's calls with every argument."""
    return {
        "config": asdict(arch.config),
        "layers": [{slot: {"name": call.name, "args": call.kwargs()} for slot, call in (("mixer", l.mixer), ("ffn", l.ffn))} for l in arch.layers],
    }


def arch_from_json(data: dict[str, Any]) -> Arch:
    """The IR back from `arch_to_json`'s plain data."""
    def call(entry: dict[str, Any]) -> Call:
        return Call(entry["name"], tuple(entry["args"].items()))

    layers = tuple(Layer(call(layer["mixer"]), call(layer["ffn"])) for layer in data["layers"])
    return Arch(ModelConfig(**data["config"]), layers)
