"""The layer stack as drawn: each distinct block once, repeat groups as "xN" brackets, and the words on it.

The layer list is drawn as it was written (the IR's outline of repeat groups). A group whose repetitions
are not identical (a bare `sliding` takes its window from the layer before it) and a list with no
outline (`from_hf`) are folded instead: runs of identical layers and of repeating patterns become
groups, so a deep model stays a few blocks tall.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterator

from ..analysis import Analysis, LayerReport
from ..human import human
from ..compiler import make_component
from ..components import REGISTRY, norm_label
from ..ir import Arch, Call, Group, Layer, ModelConfig, fold
from .text import Network

SPAN_CHARS = 36  # a block's layer list longer than this is given as a count
# (fill, stroke) pairs: cool colours for mixers, warm ones for FFNs. A kind takes the pair its name hashes
# to, so it keeps its colour from one diagram to the next (the next free pair if two kinds meet).
PALETTES = {
    "mixer": (("#e6def3", "#6f4fa8"), ("#d3eef0", "#23858f"), ("#dbe8f6", "#3b70ae"), ("#dfe3ea", "#4b5d7a"), ("#d9efdf", "#2f8a4c")),
    "ffn": (("#f6dbe7", "#b0467f"), ("#f7efc6", "#a08310"), ("#f7dcd7", "#bb4034"), ("#ece2d6", "#8a6240"), ("#fde5cc", "#cf6f1d")),
}
OTHER_PALETTE = (("#e3f0d0", "#5b8a1e"), ("#f3e3f7", "#8e3fa3"), ("#e0ecec", "#3f7f7f"))  # sublayers of any other slot


@dataclass(frozen=True)
class Block:
    """One drawn layer block, standing for all the (identical) layers in `indices`."""

    indices: tuple[int, ...]

    @property
    def index(self) -> int:
        """The first layer it stands for."""
        return self.indices[0]


@dataclass(frozen=True)
class Repeated:
    """A group drawn once with an "xN" bracket."""

    count: int
    items: tuple[Block | Repeated, ...]


Item = Block | Repeated


def stack(arch: Arch) -> tuple[Item, ...]:
    """The model's layers as drawn, first layer first."""
    return _draw(arch.layers, arch.outline or tuple(range(len(arch.layers))), (0,))


def _draw(layers: tuple[Layer, ...], outline: tuple[int | Group, ...], offsets: tuple[int, ...], folded: bool = False) -> tuple[Item, ...]:
    """Items for an outline; `offsets` shift its layer indices to every repetition it stands for. A written outline's
    runs of single layers, and its groups whose repetitions differ, are folded (`ir.fold`); a folded one is drawn as is."""
    items: list[Item] = []
    run: list[int] = []  # consecutive single layers as written, folded together

    def flush() -> None:
        if run:
            items.extend(_draw(layers, fold(layers, run[0], run[-1] + 1), offsets, folded=True))
            run.clear()

    for entry in outline:
        if isinstance(entry, int):
            if folded:
                items.append(Block(tuple(sorted(entry + o for o in offsets))))
            else:
                run.append(entry)
            continue
        flush()
        period = (entry.stop - entry.start) // entry.count
        if entry.count == 1:
            items += _draw(layers, entry.body, offsets, folded)
        elif layers[entry.start:entry.stop] == layers[entry.start:entry.start + period] * entry.count:
            repeats = tuple(o + r * period for o in offsets for r in range(entry.count))
            items.append(Repeated(entry.count, _draw(layers, entry.body, repeats, folded)))
        else:
            items += _draw(layers, fold(layers, entry.start, entry.stop), offsets, folded=True)
    flush()
    return tuple(items)


def blocks(items: tuple[Item, ...]) -> Iterator[Block]:
    """Every block, first layer first."""
    for item in items:
        yield from blocks(item.items) if isinstance(item, Repeated) else (item,)


def depth(items: tuple[Item, ...]) -> int:
    """How deeply repeat brackets nest."""
    return max((1 + depth(item.items) for item in items if isinstance(item, Repeated)), default=0)


def family(call: Call) -> str:
    """A label for diagrams: the component's folder under nanollm/components (attention, ffn, ...), else its kind."""
    spec = REGISTRY[call.name]
    parts = spec.module.__module__.split(".")
    return parts[-2] if parts[:2] == ["nanollm", "components"] and len(parts) > 3 else spec.kind


def describe(call: Call, config: ModelConfig) -> list[str]:
    """What a component's box says under its name: the component's own description (its telling arguments,
    attention's head layout); the full call is in the tooltip and the tables."""
    return REGISTRY[call.name].module.describe(call, config)


def figures(report: LayerReport) -> list[str]:
    """A layer's figures as a block is annotated with them (active parameters and the cache only where they tell)."""
    shown = [f"params {human(report.params)}"]
    if report.params_active != report.params:
        shown.append(f"active {human(report.params_active)}")
    shown.append(f"FLOPs/token {human(report.flops_per_token_fwd)}")
    if report.cache_bytes_per_token:
        shown.append(f"cache {human(report.cache_bytes_per_token, 'B')}/token")
    if report.state_bytes:
        shown.append(f"state {human(report.state_bytes, 'B')}/sequence")
    return shown


def head_flops(analysis: Analysis) -> float:
    """Forward FLOPs per token outside the layers: the LM head (the embedding lookup and norms count none)."""
    return analysis.flops_per_token_fwd - sum(r.flops_per_token_fwd for r in analysis.layers)


def embedding_text(config: ModelConfig) -> tuple[list[str], list[str]]:
    """The embedding's detail lines and figures."""
    return [f"{config.vocab_size:,} × {config.d_model}"], [f"params {human(config.vocab_size * config.d_model)}"]


def head_text(config: ModelConfig, analysis: Analysis) -> tuple[list[str], list[str]]:
    """The LM head's detail lines and figures (its own parameters only when it is not tied)."""
    flops = f"FLOPs/token {human(head_flops(analysis))}"
    if config.tie_embeddings:
        return [f"{config.d_model} → {config.vocab_size:,}, tied to the embedding"], [flops]
    own = f"own {config.vocab_size:,} × {config.d_model} matrix"
    return [f"{config.d_model} → {config.vocab_size:,}, {own}"], [f"params {human(config.vocab_size * config.d_model)}", flops]


def colours(kinds: list[str]) -> dict[str, tuple[str, str]]:
    """(fill, stroke) for each component kind: mixers, then FFNs, then other sublayers, each in order of first appearance."""
    taken: dict[str, tuple[str, str]] = {}
    for slot in (*PALETTES, None):  # None: any other slot
        palette = PALETTES.get(slot, OTHER_PALETTE)
        for kind in kinds:
            if kind in taken or (REGISTRY[kind].kind if REGISTRY[kind].kind in PALETTES else None) != slot:
                continue
            start = zlib.crc32(kind.encode())
            free = [palette[(start + k) % len(palette)] for k in range(len(palette))]
            taken[kind] = next((pair for pair in free if pair not in taken.values()), free[0])
    return taken


def layer_span(indices: tuple[int, ...]) -> str:
    """'layers 0–4, 6–10', or '20 layers' when the ranges would be long."""
    ranges: list[list[int]] = []
    for i in indices:
        if ranges and ranges[-1][1] == i - 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    text = ("layers " if len(indices) > 1 else "layer ") + ", ".join(f"{a}–{b}" if b > a else str(a) for a, b in ranges)
    return text if len(text) <= SPAN_CHARS else f"{len(indices)} layers"


def kinds(arch: Arch) -> list[str]:
    """The component kinds of a model's layers, in order of first appearance."""
    return list(dict.fromkeys(call.name for layer in arch.layers for call in layer.calls()))


def site_picture(arch: Arch, layer: Layer, slot: str) -> tuple[list[str], list[str]]:
    """The labels drawn on a sublayer's branch before and after its component (norms), as its residual scheme places them."""
    return make_component(layer.residual, arch.config).picture(slot)


def residual_words(arch: Arch) -> str:
    """One line on how sublayers meet the residual stream, for a diagram's legend."""
    schemes = dict.fromkeys(layer.residual for layer in arch.layers)
    lines = [REGISTRY[call.name].module.formula for call in schemes]
    return lines[0] if len(lines) == 1 else "; ".join(f"{call.name}: {line}" for call, line in zip(schemes, lines))


def stack_network(arch: Arch, analysis: Analysis, items: tuple[Item, ...]) -> Network:
    """The layer stack for DOT and Mermaid: a cluster per repeat group ("xN") and per block (its figures)."""
    config, palette = arch.config, colours(kinds(arch))
    network = Network("BT")
    details, numbers = embedding_text(config)
    network.edge(network.node("tokens", ["token ids"], shape="text"), network.node("embed", ["Embedding", *details, *numbers]))
    stream = "embed"

    def add(items: tuple[Item, ...], clusters: tuple[str, ...]) -> None:
        nonlocal stream
        for item in items:
            if isinstance(item, Repeated):
                group = f"r{len(network.clusters)}"
                network.clusters[group] = [f"×{item.count}"]
                add(item.items, clusters + (group,))
                continue
            block = f"b{len(network.clusters)}"
            network.clusters[block] = [layer_span(item.indices), ", ".join(figures(analysis.layers[item.index]))]
            layer = arch.layers[item.index]
            for slot, call in layer.sublayers:
                inside = clusters + (block,)
                before, after = site_picture(arch, layer, slot)
                chain = [network.node(f"{block}_{slot}_before{k}", [label], clusters=inside) for k, label in enumerate(before)]
                lines = [f"{call.name} · {family(call)}", *describe(call, config)]
                chain.append(network.node(f"{block}_{slot}", lines, palette[call.name], clusters=inside))
                chain += [network.node(f"{block}_{slot}_after{k}", [label], clusters=inside) for k, label in enumerate(after)]
                residual = network.node(f"{block}_{slot}_add", ["+"], shape="circle", clusters=inside)
                for source, target in zip([stream, *chain], [*chain, residual]):
                    network.edge(source, target)
                network.edge(stream, residual, dashed=True)
                stream = residual

    add(items, ())
    network.edge(stream, network.node("norm", [norm_label(config)]))
    details, numbers = head_text(config, analysis)
    network.edge("norm", network.node("head", ["LM head", *details, *numbers]))
    network.edge("head", network.node("logits", ["logits"], shape="text"))
    return network
