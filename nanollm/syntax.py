"""Parsing .arch text into a syntax tree that keeps source positions, and printing it canonically."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from typing import Union

import lark

from .cache import cache_dir
from .errors import ArchError, Pos, Source


@dataclass(frozen=True)
class Value:
    """A literal as written: a number, a bare name, or a string."""

    text: str
    kind: str  # "number" | "name" | "string"
    pos: Pos


@dataclass(frozen=True)
class Term:
    """A component call or a reference to a `let` name; `args` is None when written without parentheses."""

    name: str
    args: tuple[Arg, ...] | None
    pos: Pos


@dataclass(frozen=True)
class Arg:
    """One call argument; `name` is None when positional; the value a literal or a call."""

    name: str | None
    value: Value | Term
    pos: Pos


@dataclass(frozen=True)
class Attr:
    """`name=term` written after a layer or a repeat group."""

    name: str
    term: Term
    pos: Pos


@dataclass(frozen=True)
class LayerStmt:
    """One layer: its mixer and attributes."""

    mixer: Term
    attrs: tuple[Attr, ...]
    pos: Pos


@dataclass(frozen=True)
class Repeat:
    """`repeat N < body > attrs`."""

    count: Value
    body: tuple[LayerItem, ...]
    attrs: tuple[Attr, ...]
    pos: Pos


LayerItem = Union[LayerStmt, Repeat]


@dataclass(frozen=True)
class Setting:
    """`name = value`: a literal, or a call (`residual = sandwich`, `rope = yarn(factor=8, original=8192)`)."""

    name: str
    value: Value | Term
    pos: Pos


@dataclass(frozen=True)
class Let:
    """`let name = term`."""

    name: str
    term: Term
    pos: Pos


@dataclass(frozen=True)
class Use:
    """`use "base.arch"`."""

    path: str
    pos: Pos


@dataclass
class ArchFile:
    """One parsed source, statements grouped by kind in source order."""

    source: Source
    uses: list[Use] = field(default_factory=list)
    settings: list[Setting] = field(default_factory=list)
    lets: list[Let] = field(default_factory=list)
    layers: list[LayerItem] = field(default_factory=list)


TOKEN_NAMES = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a quoted string",
    "_SEP": "a new line or ';'",
    "LPAR": "'('",
    "RPAR": "')'",
    "LESSTHAN": "'<'",
    "MORETHAN": "'>'",
    "EQUAL": "'='",
    "COMMA": "','",
    "USE": "'use'",
    "LET": "'let'",
    "REPEAT": "'repeat'",
    "$END": "end of file",
}


@functools.cache
def parser() -> lark.Lark:
    """The LALR parser for grammar/arch.lark (shipped in the package as nanollm.grammar)."""
    grammar = resources.files("nanollm.grammar").joinpath("arch.lark").read_text()
    # Building the LALR tables takes a tenth of a second of every command; lark keeps them in nanollm's cache
    # folder, checked against a digest of the grammar, its options and lark's version.
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: build the tables each time
        return lark.Lark(grammar, start="file", parser="lalr", propagate_positions=True)
    return lark.Lark(grammar, start="file", parser="lalr", propagate_positions=True, cache=str(folder / "arch-grammar.lark"))


def parse(text: str, name: str = "<text>") -> ArchFile:
    """Parse .arch source text; syntax errors raise ArchError with the position."""
    source = Source(name, text)
    try:
        tree = parser().parse(text)
    except lark.exceptions.UnexpectedInput as error:
        raise syntax_error(error, source) from None
    return _Builder(source).file(tree)


def syntax_error(error: lark.exceptions.UnexpectedInput, source: Source) -> ArchError:
    """Turn a lark error into an ArchError naming what was found and what was expected."""
    line, col = max(error.line, 1), max(error.column, 1)
    if isinstance(error, lark.exceptions.UnexpectedCharacters):
        found = repr(source.text[error.pos_in_stream]) if error.pos_in_stream < len(source.text) else "end of file"
        expected = error.allowed
    elif isinstance(error, lark.exceptions.UnexpectedToken):
        token = error.token
        found = "end of file" if token.type == "$END" else ("end of line" if token.type == "_SEP" else repr(str(token)))
        expected = error.expected
        if token.type == "$END":
            lines = source.text.splitlines() or [""]
            line, col = len(lines), len(lines[-1]) + 1
    else:
        found, expected = "end of file", getattr(error, "expected", set())
    names = sorted({TOKEN_NAMES.get(t, repr(t)) for t in expected})
    hint = f"expected {', '.join(names)}" if names else None
    return ArchError(f"unexpected {found}", Pos(source, line, col), hint)


class _Builder:
    """Builds the syntax tree from lark's parse tree."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def pos(self, item: lark.Tree | lark.Token) -> Pos:
        if isinstance(item, lark.Token):
            return Pos(self.source, item.line, item.column, max(1, len(str(item))))
        m = item.meta
        width = m.end_column - m.column if m.line == m.end_line else 1
        return Pos(self.source, m.line, m.column, max(1, width))

    def file(self, tree: lark.Tree) -> ArchFile:
        result = ArchFile(self.source)
        for node in tree.children:
            if node.data == "use":
                token = node.children[0]
                result.uses.append(Use(str(token)[1:-1], self.pos(token)))
            elif node.data == "setting":
                name, value = node.children
                result.settings.append(Setting(str(name), self.argvalue(value), self.pos(name)))
            elif node.data == "let":
                name, term = node.children
                result.lets.append(Let(str(name), self.term(term), self.pos(name)))
            else:
                result.layers.append(self.layer_item(node))
        return result

    def layer_item(self, node: lark.Tree) -> LayerItem:
        if node.data == "layer":
            mixer, *attrs = node.children
            return LayerStmt(self.term(mixer), tuple(self.attr(a) for a in attrs), self.pos(node))
        count, *rest = node.children
        body = tuple(self.layer_item(c) for c in rest if c.data in ("layer", "repeat"))
        attrs = tuple(self.attr(c) for c in rest if c.data == "attr")
        return Repeat(self.value(count), body, attrs, self.pos(node))

    def attr(self, node: lark.Tree) -> Attr:
        name, term = node.children
        return Attr(str(name), self.term(term), self.pos(name))

    def term(self, node: lark.Tree) -> Term:
        name, *args = node.children
        parsed = tuple(self.arg(a) for a in args if a is not None)  # `f()` parses as [NAME, None]
        return Term(str(name), parsed if args else None, self.pos(name))

    def arg(self, node: lark.Tree) -> Arg:
        if node.data == "keyword":
            name, value = node.children
            return Arg(str(name), self.argvalue(value), self.pos(name))
        return Arg(None, self.argvalue(node.children[0]), self.pos(node))

    def argvalue(self, node: lark.Tree) -> Value | Term:
        return self.term(node) if node.data == "call" else self.value(node)

    def value(self, node: lark.Tree) -> Value:
        token = node.children[0]
        kind = {"NUMBER": "number", "NAME": "name", "STRING": "string"}[token.type]
        return Value(str(token), kind, self.pos(token))


# ---- canonical printing -------------------------------------------------------------------------

LINE_LIMIT = 88


def format_file(arch: ArchFile, setting_order: list[str]) -> str:
    """The canonical text of a file: use, settings (declaration order), lets, then layers."""
    rank = {name: i for i, name in enumerate(setting_order)}
    blocks = []
    if arch.uses:
        blocks.append([f'use "{u.path}"' for u in arch.uses])
    if arch.settings:
        ordered = sorted(arch.settings, key=lambda s: rank.get(s.name, len(rank)))
        blocks.append([f"{s.name} = {format_argvalue(s.value)}" for s in ordered])
    if arch.lets:
        blocks.append([f"let {let.name} = {format_term(let.term)}" for let in arch.lets])
    if arch.layers:
        blocks.append([line for item in arch.layers for line in format_item(item, "")])
    return "\n\n".join("\n".join(block) for block in blocks) + "\n"


def format_term(term: Term) -> str:
    """`name` or `name(arg, key=value)`."""
    if term.args is None:
        return term.name
    args = [(f"{a.name}={format_argvalue(a.value)}" if a.name else format_argvalue(a.value)) for a in term.args]
    return f"{term.name}({', '.join(args)})"


def format_argvalue(value: Value | Term) -> str:
    """A literal as written, or a call."""
    return format_term(value) if isinstance(value, Term) else value.text


def format_attrs(attrs: tuple[Attr, ...]) -> str:
    return "".join(f" {a.name}={format_term(a.term)}" for a in attrs)


def format_item(item: LayerItem, indent: str) -> list[str]:
    """Lines for one layer statement or repeat group; a group of plain layers stays on one line if it fits."""
    if isinstance(item, LayerStmt):
        return [indent + format_term(item.mixer) + format_attrs(item.attrs)]
    head, tail = f"repeat {item.count.text} <", ">" + format_attrs(item.attrs)
    if all(isinstance(child, LayerStmt) for child in item.body):
        one_line = f"{indent}{head} {'; '.join(format_item(c, '')[0] for c in item.body)} {tail}"
        if len(one_line) <= LINE_LIMIT:
            return [one_line]
    inner = [line for child in item.body for line in format_item(child, indent + "    ")]
    return [indent + head, *inner, indent + tail]
