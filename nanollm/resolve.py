"""Resolution: a parsed file (and the base files it uses) -> the typed IR, with every semantic check."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .components import KINDS, REGISTRY, SLOTS, Param
from .errors import ArchError, Pos, did_you_mean
from .ir import Arch, Call, Group, Layer, ModelConfig
from .syntax import Arg, ArchFile, Attr, LayerItem, LayerStmt, Let, Repeat, Setting, Term, Value, parse

STATEMENT_SLOT = "mixer"  # a layer statement names its mixer; the other slots are attributes
NONE = "none"  # a slot written `none` has no sublayer
RESIDUAL = "residual"  # the attribute giving a layer its own residual scheme
ATTRIBUTES = (*(slot for slot in SLOTS if slot != STATEMENT_SLOT), RESIDUAL)
AUTO = "auto"  # a size left free for budget sizing
MAX_LAYERS = 1024  # past every real model (and DeepNet's 1,000 layers); a longer list is refused before it is expanded
SUFFIXES = {"k": 1024, "M": 1024**2, "G": 1024**3}
SHORTHAND = re.compile(r"^([A-Za-z_]+?)(\d+)$")  # `top2` means top=2


def read(path_or_text: str | os.PathLike) -> ArchFile:
    """Parse a file path (str or Path) or, for any other string, the .arch text itself."""
    is_path = isinstance(path_or_text, os.PathLike) or (
        "\n" not in path_or_text and (path_or_text.endswith(".arch") or os.path.isfile(path_or_text))
    )
    if not is_path:
        return parse(path_or_text)
    path = Path(path_or_text)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ArchError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    return parse(text, str(path))


def load(path_or_text: str | os.PathLike, **overrides: Any) -> Arch:
    """Read, merge with bases, expand and check a model description; keyword overrides replace settings."""
    return resolve(read(path_or_text), overrides)


@dataclass
class Merged:
    """A file merged with the chain of files it uses: later files override by name."""

    settings: dict[str, Setting]
    lets: dict[str, Let]
    layers: list[LayerItem]


def merge(arch: ArchFile, chain: tuple[str, ...] = ()) -> Merged:
    """Merge `arch` over its base: settings and lets by name; its layer list, if any, replaces the base's."""
    base = Merged({}, {}, [])
    for extra in arch.uses[1:]:
        raise ArchError("a file may use only one base", extra.pos)
    if arch.uses:
        use = arch.uses[0]
        here = Path(arch.source.name).parent if not arch.source.name.startswith("<") else Path.cwd()
        path = (here / use.path).resolve()
        if str(path) in chain:
            raise ArchError(f"'{use.path}' is already being read: files use each other in a cycle", use.pos)
        if not path.is_file():
            raise ArchError(f"base file '{use.path}' not found (looked for {path})", use.pos)
        base = merge(read(path), chain + (str(Path(arch.source.name).resolve()), str(path)))
    settings, lets = dict(base.settings), dict(base.lets)
    for kind, items, merged in (("setting", arch.settings, settings), ("definition", arch.lets, lets)):
        first: dict[str, Any] = {}
        for item in items:
            if item.name in first:
                raise ArchError(f"{kind} '{item.name}' given twice (first on line {first[item.name].pos.line})", item.pos)
            first[item.name] = merged[item.name] = item
    return Merged(settings, lets, arch.layers or base.layers)


def resolve(arch: ArchFile, overrides: dict[str, Any] | None = None) -> Arch:
    """Check and expand a parsed file into the IR."""
    merged = merge(arch)
    config = make_config(merged.settings, overrides or {}, merged.lets)
    layers, outline = Expander(config, merged.lets).layers(merged.layers)
    if merged.layers:
        stated = merged.settings.get("n_layers")
        count = (overrides or {}).get("n_layers", stated and config.n_layers)
        if count is not None and count != len(layers):
            raise ArchError(
                f"n_layers = {count} but the layer list has {len(layers)} layers",
                None if "n_layers" in (overrides or {}) else stated.pos,
                "the layer list is the model: drop n_layers or make the list match it",
            )
        config = dataclasses.replace(config, n_layers=len(layers))
    else:
        if config.n_layers > MAX_LAYERS:
            raise ArchError(f"n_layers = {config.n_layers:,}: nanollm allows at most {MAX_LAYERS:,} layers", merged.settings["n_layers"].pos
                            if "n_layers" in merged.settings else None)
        layers = Expander(config, merged.lets).layers([default_layer()])[0] * config.n_layers
        outline = (Group(config.n_layers, 0, config.n_layers, (0,)),)  # `repeat n_layers < global >`
    return Arch(config, tuple(layers), outline)


def default_layer() -> LayerStmt:
    """The layer of a file without a layer list: the default mixer (and every other slot's default)."""
    return LayerStmt(Term(SLOTS[STATEMENT_SLOT], None, None), (), None)


def make_config(settings: dict[str, Setting], overrides: dict[str, Any], lets: dict[str, Let] | None = None) -> ModelConfig:
    """Typed, range-checked ModelConfig from the merged settings and keyword overrides."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    values: dict[str, Any] = {}
    calls: dict[str, Setting] = {}  # resolved once the other settings (their arguments' defaults) are known
    for name, item in settings.items():
        if name not in fields:
            raise ArchError(f"unknown setting '{name}'", item.pos, did_you_mean(name, fields) or f"settings: {', '.join(fields)}")
        meta = fields[name].metadata
        if meta["kind"] and name not in overrides:
            calls[name] = item
        elif name not in overrides:
            values[name] = convert(item.value, fields[name].type, name, meta["minimum"], meta["maximum"], meta["choices"], meta["aliases"])
    for name, value in overrides.items():
        if name not in fields:
            raise ArchError(f"unknown setting '{name}' in overrides", None, did_you_mean(name, fields))
        values[name] = override(name, value, fields[name])
    expander = Expander(ModelConfig(**values), lets or {})
    for name, item in calls.items():
        values[name] = expander.call(as_term(item.value, name, fields[name].metadata["kind"]), fields[name].metadata["kind"])
    config = ModelConfig(**values)

    def where(name: str) -> Pos | None:
        return settings[name].pos if name in settings and name not in overrides else None

    if config.n_heads % config.n_kv_heads:
        raise ArchError(f"n_kv_heads = {config.n_kv_heads} does not divide n_heads = {config.n_heads}", where("n_kv_heads") or where("n_heads"))
    problem = REGISTRY[config.rope.name].module.problem(config.head_dim, **config.rope.kwargs())
    if problem:
        raise ArchError(f"head_dim = {config.head_dim}: {problem}", where("head_dim") or where("rope"))
    return config


def override(name: str, value: Any, field: dataclasses.Field) -> Any:
    """A keyword override checked against its setting's type (a call setting also takes a component name)."""
    kind = {"int": int, "float": float, "bool": bool, "str": str, "Call": Call}[field.type]
    if kind is Call and isinstance(value, str):
        value = Call(value)
    elif kind is str and isinstance(value, bool) and field.metadata["aliases"]:
        value = field.metadata["aliases"][str(value).lower()]
    if not isinstance(value, kind) and not (kind is float and isinstance(value, int) and not isinstance(value, bool)):
        raise ArchError(f"override {name}={value!r}: expected {kind.__name__}")
    if field.metadata["choices"] and value not in field.metadata["choices"]:
        raise ArchError(f"override {name}={value!r}: expected one of {', '.join(field.metadata['choices'])}")
    return value if kind is Call else kind(value)


def as_term(value: Value | Term, what: str, kind: str) -> Term:
    """A value where a call is expected: a call, or a bare name (`residual = sandwich`)."""
    if isinstance(value, Term):
        return value
    if value.kind != "name":
        raise ArchError(f"{what} takes {KINDS[kind]} (a name or a call), not {value.text}", value.pos)
    return Term(value.text, None, value.pos)


def convert(value: Value | Term, kind: str | type, what: str, minimum: float | None = None, maximum: float | None = None,
            choices: tuple[str, ...] = (), aliases: dict[str, str] | None = None) -> Any:
    """A literal converted to int, float, bool or str, or an ArchError naming what was expected."""
    kind = kind if isinstance(kind, str) else kind.__name__
    if isinstance(value, Term):
        expected = {"bool": "true or false", "str": "a name", "int": "a number", "float": "a number"}[kind]
        raise ArchError(f"{what} takes {expected}, not a call", value.pos)
    if kind == "bool":
        if value.kind == "name" and value.text in ("true", "false"):
            return value.text == "true"
        raise ArchError(f"{what} takes true or false, not {value.text}", value.pos)
    if kind == "str":
        text = (aliases or {}).get(value.text, value.text.strip('"'))
        if choices and text not in choices:
            words = ", ".join(choices) + (f" (or {', '.join(aliases)})" if aliases else "")
            raise ArchError(f"{what} takes {words}, not {value.text}", value.pos, did_you_mean(text, choices))
        return text
    if value.text == AUTO:
        raise ArchError(f"{what} is auto: only `nanollm compile --budget` can choose it", value.pos)
    if value.kind != "number":
        raise ArchError(f"{what} takes a number, not {value.text}", value.pos)
    number = parse_number(value.text)
    if kind == "int":
        if number != int(number):
            raise ArchError(f"{what} takes a whole number, not {value.text}", value.pos)
        number = int(number)
    else:
        number = float(number)
    if minimum is not None and number < minimum:
        bound = "positive" if minimum == 1 and kind == "int" else f"at least {minimum:g}"
        raise ArchError(f"{what} must be {bound}, got {value.text}", value.pos)
    if maximum is not None and number > maximum:
        bound = f"{int(maximum):,}" if kind == "int" else f"{maximum:g}"
        raise ArchError(f"{what} must be at most {bound}, got {value.text}", value.pos)
    return number


def parse_number(text: str) -> int | float:
    """`4096`, `1e6`, `0.02`, `32k` (x1024), `1M`, `1_000`."""
    text = text.replace("_", "")
    scale = SUFFIXES.get(text[-1], 1)
    if scale != 1:
        text = text[:-1]
    number = float(text) if any(c in text for c in ".eE") else int(text)
    return number * scale


def stream_count(residual: Call, config: ModelConfig) -> int:
    """The residual streams a scheme's call keeps."""
    return REGISTRY[residual.name].module(config, **residual.kwargs()).streams


class Expander:
    """Expands repeats, applies attributes and definitions, and resolves every component call."""

    def __init__(self, config: ModelConfig, lets: dict[str, Let]) -> None:
        self.config, self.lets = config, lets
        self.carried: dict[tuple[str, str], Any] = {}

    def layers(self, items: list[LayerItem]) -> tuple[list[Layer], tuple[int | Group, ...]]:
        """Resolved layers in model order, and the outline of the list as written."""
        flat: list[tuple[LayerStmt, dict[str, Attr]]] = []
        outline = self.expand(items, {}, flat)
        return [self.layer(statement, attrs) for statement, attrs in flat], outline

    def layer(self, statement: LayerStmt, attrs: dict[str, Attr]) -> Layer:
        """One layer: a call per slot it has (written, or the slot's default), in slot order, and its residual scheme."""
        written = {STATEMENT_SLOT: statement.mixer, **{name: attr.term for name, attr in attrs.items() if name in SLOTS}}
        sublayers = []
        for slot, default in SLOTS.items():
            term = self.deref(written[slot]) if slot in written else Term(default or NONE, None, None)
            if term.name != NONE:
                sublayers.append((slot, self.call(term, slot)))
        if not sublayers:
            raise ArchError("this layer has no sublayer: every slot is none", statement.pos)
        residual = self.config.residual
        if RESIDUAL in attrs:
            term = attrs[RESIDUAL].term
            residual = self.call(term, RESIDUAL)
            streams = (stream_count(residual, self.config), stream_count(self.config.residual, self.config))
            if streams[0] != streams[1]:
                raise ArchError(f"{residual.name} keeps {streams[0]} residual stream(s) but the model's residual "
                                f"({self.config.residual.name}) keeps {streams[1]}: layers cannot mix them", term.pos)
        return Layer(tuple(sublayers), residual)

    def expand(self, items: tuple[LayerItem, ...] | list[LayerItem], inherited: dict[str, Attr], out: list) -> tuple[int | Group, ...]:
        """Append the (statement, attributes) of each layer to `out`; returns the items' outline."""
        outline: list[int | Group] = []
        for item in items:
            for attr in item.attrs:
                if attr.name not in ATTRIBUTES:
                    hint = did_you_mean(attr.name, ATTRIBUTES) or f"layer attributes: {', '.join(ATTRIBUTES)}"
                    raise ArchError(f"unknown layer attribute '{attr.name}'", attr.pos, hint)
            attrs = {**inherited, **{a.name: a for a in item.attrs}}
            if isinstance(item, LayerStmt):
                outline.append(len(out))
                out.append((item, attrs))
            else:
                if not item.body:
                    raise ArchError("repeat group has no layers", item.pos)
                count = convert(item.count, "int", "repeat count", minimum=1)
                total = len(out) + count * expanded_size(item.body)
                if total > MAX_LAYERS:
                    raise ArchError(f"the layer list grows to {total:,} layers here: nanollm allows at most {MAX_LAYERS:,}", item.count.pos)
                start = len(out)
                body = self.expand(item.body, attrs, out)
                for _ in range(count - 1):
                    self.expand(item.body, attrs, out)
                outline.append(Group(count, start, len(out), body))
        return tuple(outline)

    def deref(self, term: Term, seen: tuple[str, ...] = ()) -> Term:
        """Follow `let` names to the component call they stand for."""
        if term.name not in self.lets:
            return term
        if term.args is not None:
            raise ArchError(f"'{term.name}' is a definition (let) and takes no arguments", term.pos)
        if term.name in seen:
            raise ArchError(f"definition '{term.name}' refers to itself", term.pos)
        return self.deref(self.lets[term.name].term, seen + (term.name,))

    def call(self, term: Term, kind: str) -> Call:
        """Resolve one call of a component of `kind`: name, arguments, defaults, ranges and the component's own check."""
        term = self.deref(term)
        spec = REGISTRY.get(term.name)
        if spec is None:
            known = [n for n, s in REGISTRY.items() if s.kind == kind]
            hint = did_you_mean(term.name, known + list(self.lets)) or f"known {kind}s: {', '.join(known)}"
            raise ArchError(f"unknown {kind} '{term.name}'", term.pos, hint)
        if spec.kind != kind:
            raise ArchError(f"'{term.name}' is {KINDS[spec.kind]}, not {KINDS[kind]}", term.pos)
        given = {name: arg for name, (_, arg) in bind(term, spec.params).items()}
        args: dict[str, Any] = {}
        for param in spec.params:
            if param.name in given:
                args[param.name] = self.argument(term.name, param, given[param.name])
            elif param.carry and (term.name, param.name) in self.carried:
                args[param.name] = self.carried[term.name, param.name]
            else:
                args[param.name] = param.default_for(self.config)
                if args[param.name] is None:
                    raise ArchError(f"{term.name} needs argument '{param.name}' ({param.doc})", term.pos)
        problem = spec.module.check(self.config, **args)
        if problem:
            raise ArchError(f"{term.name}: {problem}", term.pos)
        for param in spec.params:
            if param.carry:
                self.carried[term.name, param.name] = args[param.name]
        return Call(term.name, tuple((p.name, args[p.name]) for p in spec.params))

    def argument(self, name: str, param: Param, arg: Arg) -> Any:
        """One written argument, converted to its parameter's type (a nested call resolved)."""
        what = f"{name}: {param.name}"
        if param.type is Call:
            return self.call(as_term(arg.value, what, param.kind), param.kind)
        value = convert(arg.value, param.type, what, param.minimum, param.maximum)
        if param.choices and value not in param.choices:
            hint = did_you_mean(value, param.choices) or f"{param.name} takes: {', '.join(param.choices)}"
            raise ArchError(f"{name}: unknown {param.name} '{value}'", arg.value.pos, hint)
        return value


def expanded_size(items: tuple[LayerItem, ...]) -> int:
    """How many layers a body expands to, without expanding it (a count that does not convert counts once)."""
    size = 0
    for item in items:
        if isinstance(item, Repeat):
            try:
                count = convert(item.count, "int", "repeat count", minimum=1)
            except ArchError:
                count = 1  # reported where it is expanded
            size += count * expanded_size(item.body)
        else:
            size += 1
    return size


def bind(term: Term, params: tuple[Param, ...]) -> dict[str, tuple[int, Arg]]:
    """Match written arguments to parameters (positional in order, `key=value`, `key<number>`): name -> (index, arg)."""
    names = [p.name for p in params]
    positional_names = [p.name for p in params if p.positional]
    given: dict[str, tuple[int, Arg]] = {}
    positional, keywords = 0, False
    for index, arg in enumerate(term.args or ()):
        name = arg.name
        value = arg.value
        shorthand = SHORTHAND.match(value.text) if name is None and isinstance(value, Value) and value.kind == "name" else None
        if shorthand and shorthand.group(1) in names:
            keywords = True
            name, arg = shorthand.group(1), dataclasses.replace(arg, value=Value(shorthand.group(2), "number", value.pos))
        elif name is None:
            if keywords:
                raise ArchError("positional argument after keyword arguments", arg.pos)
            if positional >= len(positional_names):
                listed = ", ".join(positional_names) or "none"
                raise ArchError(f"{term.name} takes {len(positional_names)} positional argument(s): {listed}", arg.pos,
                                "give the others by name" if len(positional_names) < len(names) else None)
            name = positional_names[positional]
            positional += 1
        else:
            keywords = True
            if name not in names:
                hint = did_you_mean(name, names) or f"{term.name} takes: {', '.join(names) or 'no arguments'}"
                raise ArchError(f"{term.name} has no argument '{name}'", arg.pos, hint)
        if name in given:
            raise ArchError(f"argument '{name}' given twice", arg.pos)
        given[name] = (index, arg)
    return given
