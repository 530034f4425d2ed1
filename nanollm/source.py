"""The IR back as .arch source: the inverse of resolution, for models that come without a file (a transformers config).

Settings are written where they differ from the defaults (call settings where they differ from the default
call completed under this model's settings), calls with only the arguments a reader needs (`components.written_args`),
and the layer list folded into repeat groups (`ir.fold`); an attribute every layer of a group shares is written
once, on the group. Printed by `syntax.format_file`, so the text is canonical, and resolving it gives the same IR.
"""
from __future__ import annotations

from dataclasses import fields, replace

from .components import SLOTS, complete, written_args
from .errors import Source
from .ir import Arch, Call, Group, Layer, ModelConfig, fold, format_value
from .resolve import NONE, RESIDUAL, STATEMENT_SLOT
from .syntax import Arg, ArchFile, Attr, LayerItem, LayerStmt, Repeat, Setting, Term, Value, format_file


def value(item: object, config: ModelConfig) -> Value | Term:
    """A setting's or argument's value as syntax: a literal, or a call with the arguments it needs."""
    if isinstance(item, Call):
        return term(item, config)
    return Value(format_value(item), "number" if isinstance(item, (int, float)) and not isinstance(item, bool) else "name", None)


def term(call: Call, config: ModelConfig) -> Term:
    """A call as a user writes it (`components.written_args`)."""
    args = tuple(Arg(name, value(v, config), None) for name, v in written_args(call, config))
    return Term(call.name, args or None, None)


def settings(config: ModelConfig) -> list[Setting]:
    """The settings that differ from their defaults (n_layers never: the layer list is the model)."""
    written = []
    for f in fields(config):
        current = getattr(config, f.name)
        default = complete(f.default, f.metadata["kind"], config) if f.metadata["kind"] else f.default
        if f.name != "n_layers" and current != default:
            written.append(Setting(f.name, value(current, config), None))
    return written


def layer_statement(layer: Layer, config: ModelConfig) -> LayerStmt:
    """One layer: its mixer (or `none`), the other slots it has or lacks, and its residual scheme if not the model's."""
    calls = dict(layer.sublayers)
    mixer = term(calls[STATEMENT_SLOT], config) if STATEMENT_SLOT in calls else Term(NONE, None, None)
    attrs = []
    for slot, default in SLOTS.items():
        if slot == STATEMENT_SLOT:
            continue
        if slot in calls:
            attrs.append(Attr(slot, term(calls[slot], config), None))
        elif default is not None:
            attrs.append(Attr(slot, Term(NONE, None, None), None))
    if layer.residual != config.residual:
        attrs.append(Attr(RESIDUAL, term(layer.residual, config), None))
    return LayerStmt(mixer, tuple(attrs), None)


def hoist(items: list[LayerItem]) -> list[LayerItem]:
    """Move an attribute every layer of a group writes alike onto the group, innermost groups first."""
    result = []
    for item in items:
        if isinstance(item, Repeat):
            body = hoist(list(item.body))
            shared = [attr for attr in body[0].attrs if all(attr in child.attrs for child in body)]
            body = [drop(child, shared) for child in body]
            item = replace(item, body=tuple(body), attrs=item.attrs + tuple(shared))
        result.append(item)
    return result


def drop(item: LayerItem, attrs: list[Attr]) -> LayerItem:
    """An item without these attributes (its group now writes them)."""
    return replace(item, attrs=tuple(a for a in item.attrs if a not in attrs))


def items(outline: tuple[int | Group, ...], statements: list[LayerStmt]) -> list[LayerItem]:
    """Syntax items for an outline: a layer statement per index, a repeat per group."""
    return [statements[entry] if isinstance(entry, int) else
            Repeat(Value(str(entry.count), "number", None), tuple(items(entry.body, statements)), (), None)
            for entry in outline]


def arch_source(arch: Arch, header: str = "") -> str:
    """The .arch text of an IR (its outline if it has one, else its layers folded into repeat groups)."""
    statements = [layer_statement(layer, arch.config) for layer in arch.layers]
    layer_items = hoist(items(arch.outline or fold(arch.layers), statements))
    text = format_file(ArchFile(Source("<import>", ""), settings=settings(arch.config), layers=layer_items), ModelConfig.setting_names())
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + ("\n" if comments else "") + text
