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

from ..analysis import Analysis, LayerReport, human
from ..components import REGISTRY
from ..ir import Arch, Call, Group, Layer, ModelConfig, format_value
from .text import Network

SPAN_CHARS = 36  # a block's layer list longer than this is given as a count
MAX_PERIOD = 64  # the longest repeating pattern looked for when folding a list
ALWAYS_SHOWN = ("experts", "top")  # a mixture of experts reads as "top k of E experts", defaults or not
# (fill, stroke) pairs: cool colours for mixers, warm ones for FFNs. A kind takes the pair its name hashes
# to, so it keeps its colour from one diagram to the next (the next free pair if two kinds meet).
PALETTES = {
    "mixer": (("#e6def3", "#6f4fa8"), ("#d3eef0", "#23858f"), ("#dbe8f6", "#3b70ae"), ("#dfe3ea", "#4b5d7a"), ("#d9efdf", "#2f8a4c")),
    "ffn": (("#f6dbe7", "#b0467f"), ("#f7efc6", "#a08310"), ("#f7dcd7", "#bb4034"), ("#ece2d6", "#8a6240"), ("#fde5cc", "#cf6f1d")),
}


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


def _draw(layers: tuple[Layer, ...], outline: tuple[int | Group, ...], offsets: tuple[int, ...]) -> tuple[Item, ...]:
    """Items for an outline; `offsets` shift its layer indices to every repetition it stands for."""
    items: list[Item] = []
    run: list[int] = []  # consecutive single layers, folded together
    for entry in outline:
        if isinstance(entry, int):
            run.append(entry)
            continue
        items += _fold(layers, run, offsets)
        run = []
        period = (entry.stop - entry.start) // entry.count
        if entry.count == 1:
            items += _draw(layers, entry.body, offsets)
        elif layers[entry.start:entry.stop] == layers[entry.start:entry.start + period] * entry.count:
            repeats = tuple(o + r * period for o in offsets for r in range(entry.count))
            items.append(Repeated(entry.count, _draw(layers, entry.body, repeats)))
        else:
            items += _fold(layers, list(range(entry.start, entry.stop)), offsets)
    return tuple(items + _fold(layers, run, offsets))


def _fold(layers: tuple[Layer, ...], run: list[int], offsets: tuple[int, ...]) -> list[Item]:
    """Consecutive layer indices folded greedily: at each position, the repeating pattern covering most layers."""
    items: list[Item] = []
    i = 0
    while i < len(run):
        start, period, count = run[i], 1, 1
        for p in range(1, min(MAX_PERIOD, (len(run) - i) // 2) + 1):
            c = 1
            while i + (c + 1) * p <= len(run) and layers[start + c * p:start + (c + 1) * p] == layers[start:start + p]:
                c += 1
            if c > 1 and p * c > period * count:
                period, count = p, c
        if count == 1:
            items.append(Block(tuple(sorted(start + o for o in offsets))))
        else:
            repeats = tuple(o + r * period for o in offsets for r in range(count))
            items.append(Repeated(count, tuple(_fold(layers, run[i:i + period], repeats))))
        i += period * count
    return items


def blocks(items: tuple[Item, ...]) -> Iterator[Block]:
    """Every block, first layer first."""
    for item in items:
        yield from blocks(item.items) if isinstance(item, Repeated) else (item,)


def depth(items: tuple[Item, ...]) -> int:
    """How deeply repeat brackets nest."""
    return max((1 + depth(item.items) for item in items if isinstance(item, Repeated)), default=0)


def family(call: Call) -> str:
    """The component's family: its folder under nanollm/components (attention, ffn, ...)."""
    return REGISTRY[call.name].module.__module__.split(".")[-2]


def describe(call: Call, config: ModelConfig, heads: bool = True) -> list[str]:
    """What a component's box says under its name: its telling arguments, and (if `heads`) attention's head layout.

    Shown: sizes (d_ff), carried arguments (a window), experts and top, and every other argument that is
    not at its default; the full call is in the tooltip and the tables.
    """
    params = {p.name: p for p in REGISTRY[call.name].params}
    shown = [
        f"{name}={format_value(value)}"
        for name, value in call.args
        if name in ALWAYS_SHOWN or params[name].width or params[name].carry or value != params[name].default_for(config)
    ]
    lines = [", ".join(shown)] if shown else []
    if heads and family(call) == "attention":
        lines.append(f"{config.n_heads} heads, {config.n_kv_heads} KV, head_dim {config.head_dim}")
    return lines


def figures(report: LayerReport) -> list[str]:
    """A layer's figures as a block is annotated with them (active parameters and KV cache only where they tell)."""
    shown = [f"params {human(report.params)}"]
    if report.params_active != report.params:
        shown.append(f"active {human(report.params_active)}")
    shown.append(f"FLOPs/token {human(report.flops_per_token_fwd)}")
    if report.kv_cache_bytes_per_token:
        shown.append(f"KV cache {human(report.kv_cache_bytes_per_token, 'B')}/token")
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
    """(fill, stroke) for each component kind: mixers, then FFNs, each in order of first appearance."""
    taken: dict[str, tuple[str, str]] = {}
    for slot, palette in PALETTES.items():
        for kind in kinds:
            if kind in taken or REGISTRY[kind].slot != slot:
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
    return list(dict.fromkeys(call.name for layer in arch.layers for call in (layer.mixer, layer.ffn)))


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
            for slot, call in (("mixer", layer.mixer), ("ffn", layer.ffn)):
                inside = clusters + (block,)
                norm = network.node(f"{block}_{slot}_norm", ["RMSNorm"], clusters=inside)
                lines = [f"{call.name} · {family(call)}", *describe(call, config)]
                component = network.node(f"{block}_{slot}", lines, palette[call.name], clusters=inside)
                residual = network.node(f"{block}_{slot}_add", ["+"], shape="circle", clusters=inside)
                network.edge(stream, norm)
                network.edge(norm, component)
                network.edge(component, residual)
                network.edge(stream, residual, dashed=True)
                stream = residual

    add(items, ())
    network.edge(stream, network.node("norm", ["RMSNorm"]))
    details, numbers = head_text(config, analysis)
    network.edge("norm", network.node("head", ["LM head", *details, *numbers]))
    network.edge("head", network.node("logits", ["logits"], shape="text"))
    return network
