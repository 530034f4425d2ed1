"""SVG written by nanollm itself: the layer stack as a paper-style block diagram, and the fx graph in ranks."""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import TYPE_CHECKING, Iterator
from xml.sax.saxutils import escape, quoteattr

from ..analysis import Analysis
from ..human import human
from ..components import REGISTRY, norm_label, telling
from ..ir import Arch, Call, Layer, ModelConfig
from .stack import (Block, Item, Repeated, blocks, colours, depth, describe, embedding_text, family, figures, head_text, kinds,
                    layer_span, residual_words, site_picture)
from .text import NEUTRAL, Network

if TYPE_CHECKING:
    import networkx as nx

FONT = "DejaVu Sans, Verdana, Helvetica, Arial, sans-serif"
INK, MUTED, FRAME, STREAM = "#222222", "#5f6368", "#9aa0a6", "#3c4043"
MARGIN = 20
BOX_W = 252  # a component's box
SKIP_W = 36  # room left of the boxes for the residual path
FRAME_W = SKIP_W + BOX_W + 16
BRACKET_W = 50  # per level of nested repeat brackets
NOTE_W = 230  # the figures column right of the stack
GAP = 18  # between stacked elements
TITLE, TEXT, SMALL = 13, 11.5, 10.5  # font sizes
LINE = 14  # height of one line of TEXT
ADD_R = 8  # the residual add's circle
NORM_H = 16
PART_H = 8 + NORM_H  # a norm on a sublayer's branch, with the gap below it
SUBLAYER_H = 8 + 8 + 10 + 2 * ADD_R  # a sublayer around its component box and norms: branch, gaps, add
DETAILED_BLOCKS = 6  # more distinct blocks than this are drawn as one row each
CHAR = 0.6  # an average character's width in font sizes (DejaVu Sans, the widest common sans)


def width_of(text: str, size: float) -> float:
    """Estimated width of a line of text."""
    return len(text) * size * CHAR


def wrap(text: str, width: float, size: float) -> list[str]:
    """Split at ", " so that each line fits `width` (a single longer item keeps a line of its own)."""
    lines: list[str] = []
    for item in text.split(", "):
        if lines and width_of(lines[-1] + ", " + item, size) <= width:
            lines[-1] += ", " + item
        else:
            lines.append(item)
    return lines


def num(value: float) -> str:
    """A coordinate, to a tenth of a pixel."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


def attributes(attrs: dict[str, object]) -> str:
    """XML attributes: numbers as coordinates; '_' in a name becomes '-', and a trailing '_' (class_) is dropped."""
    text = ""
    for key, value in attrs.items():
        if value is not None:
            text += f" {key.rstrip('_').replace('_', '-')}={quoteattr(value if isinstance(value, str) else num(value))}"
    return text


class Canvas:
    """SVG elements in drawing order."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, tag: str, content: str = "", **attrs: object) -> None:
        """One element; `content` is markup."""
        self.parts.append(f"<{tag}{attributes(attrs)}>{content}</{tag}>" if content else f"<{tag}{attributes(attrs)}/>")

    @contextlib.contextmanager
    def group(self, tooltip: str | None = None, **attrs: object) -> Iterator[None]:
        """A <g> around what is drawn inside the `with` block, with a tooltip shown on hover."""
        self.parts.append(f"<g{attributes(attrs)}>")
        if tooltip:
            self.parts.append(f"<title>{escape(tooltip)}</title>")
        yield
        self.parts.append("</g>")

    def text(self, x: float, y: float, text: str, size: float = TEXT, fill: str = INK, anchor: str | None = None, bold: bool = False) -> None:
        """A line of text with its baseline at y."""
        self.add("text", escape(text), x=x, y=y, font_size=size, fill=fill, text_anchor=anchor,
                 font_weight="bold" if bold else None)

    def box(self, x: float, y: float, w: float, h: float, pair: tuple[str, str], radius: float = 6) -> None:
        """A rounded rectangle filled and outlined with a (fill, stroke) pair."""
        self.add("rect", x=x, y=y, width=w, height=h, rx=radius, fill=pair[0], stroke=pair[1], stroke_width=1.2)

    def line(self, points: list[tuple[float, float]], arrow: bool = True) -> None:
        """A polyline, ending in an arrowhead unless told otherwise."""
        d = "M" + " L".join(f"{num(x)} {num(y)}" for x, y in points)
        self.add("path", d=d, fill="none", stroke=STREAM, stroke_width=1.3, marker_end="url(#arrow)" if arrow else None)

    def svg(self, width: float, height: float) -> str:
        """The standalone document."""
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{num(width)}" height="{num(height)}" '
            f'viewBox="0 0 {num(width)} {num(height)}" font-family="{FONT}">\n'
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            f'orient="auto"><path d="M0 0 L10 5 L0 10 z" fill="{STREAM}"/></marker></defs>\n'
            '<rect width="100%" height="100%" fill="#ffffff"/>\n' + "\n".join(self.parts) + "\n</svg>\n"
        )


def box_height(lines: list[str]) -> float:
    """Height of a labelled box with these detail lines."""
    return 8 + LINE * (1 + len(lines)) + 4


def labelled_box(c: Canvas, x: float, y: float, w: float, title: str, lines: list[str], pair: tuple[str, str], tag: str = "") -> float:
    """A box with a bold title (and a grey tag after it) over detail lines; returns its height."""
    c.box(x, y, w, box_height(lines), pair)
    c.add("text", f'<tspan font-weight="bold">{escape(title)}</tspan><tspan fill="{MUTED}">{escape(tag)}</tspan>',
          x=x + 10, y=y + 5 + TITLE, font_size=TITLE, fill=INK)
    for k, line in enumerate(lines):
        c.text(x + 10, y + 5 + TITLE + LINE * (k + 1), line)
    return box_height(lines)


def component_lines(call: Call, config: ModelConfig, width: float, detailed: bool = True) -> list[str]:
    """A component's detail lines, wrapped to its box: its description, or in a row only its telling arguments."""
    lines = describe(call, config) if detailed else [line for line in [telling(call, config)] if line]
    return [part for line in lines for part in wrap(line, width - 20, TEXT)]


class StackDrawing:
    """The layer stack drawn top down (the last layer on top): head, norm, blocks with brackets, embedding."""

    def __init__(self, arch: Arch, analysis: Analysis, items: tuple[Item, ...]) -> None:
        self.arch, self.config, self.analysis, self.items = arch, arch.config, analysis, items
        self.palette = colours(kinds(arch))
        self.detailed = len(list(blocks(items))) <= DETAILED_BLOCKS
        self.x0 = MARGIN + depth(items) * BRACKET_W  # the block frames' left edge
        self.box_x = self.x0 + SKIP_W
        self.cx = self.box_x + BOX_W / 2  # the residual stream
        self.note_x = self.x0 + FRAME_W + 16
        self.width = self.note_x + NOTE_W + MARGIN
        self.c = Canvas()
        self.y = 0.0  # the drawing cursor, moving down
        self.above = 0.0  # the bottom of the element above, where the stream arrives

    def draw(self, name: str, notes: list[str]) -> str:
        """The whole SVG document."""
        c, config, analysis = self.c, self.config, self.analysis
        self.y = MARGIN
        self.header(name, notes)
        c.text(self.cx, self.y + 10, f"logits over {config.vocab_size:,} tokens", size=SMALL, fill=MUTED, anchor="middle")
        self.above = self.y + 14
        self.y += 14 + GAP
        with c.group(class_="head"):
            self.stream_box("LM head", *head_text(config, analysis))
        self.y += GAP
        top = self.y
        c.box(self.box_x + 60, top, BOX_W - 120, NORM_H + 2, NEUTRAL, radius=4)
        c.text(self.cx, top + 13, norm_label(config), size=SMALL, anchor="middle")
        self.arrive(top, top + NORM_H + 2)
        self.y = top + NORM_H + 2
        self.place(self.items, 0)
        self.y += GAP
        with c.group(class_="embedding"):
            self.stream_box("Embedding", *embedding_text(config))
        self.y += GAP
        c.line([(self.cx, self.y), (self.cx, self.above)])
        c.text(self.cx, self.y + 12, "token ids", size=SMALL, fill=MUTED, anchor="middle")
        return c.svg(self.width, self.y + 16 + MARGIN)

    def header(self, name: str, notes: list[str]) -> None:
        """Title, the model's figures and the colour legend."""
        c, config, analysis = self.c, self.config, self.analysis
        self.y += 16
        c.text(MARGIN, self.y, name, size=16, bold=True)
        summary = [
            f"{len(self.arch.layers)} layers, d_model {config.d_model}, {config.n_heads} heads ({config.n_kv_heads} KV) × {config.head_dim}, "
            f"vocab {config.vocab_size:,}, seq_len {analysis.seq_len}",
            f"{human(analysis.params_total)} params" + (f" ({human(analysis.params_active)} active)" if analysis.params_active != analysis.params_total else "")
            + f", {human(analysis.flops_per_token_fwd)} FLOPs/token forward, inference cache {human(analysis.cache_bytes_per_token, 'B')}/token"
            + (f" (of which a state of {human(analysis.state_bytes, 'B')}/sequence)" if analysis.state_bytes else ""),
            *notes,
        ]
        for line in summary:
            for part in wrap(line, self.width - 2 * MARGIN, TEXT):
                self.y += LINE + 2
                c.text(MARGIN, self.y, part, fill=MUTED)
        self.y += 12
        x = MARGIN
        for kind, pair in self.palette.items():
            label = f"{kind} {REGISTRY[kind].kind}"
            if x + 20 + width_of(label, SMALL) > self.width - MARGIN:
                x, self.y = MARGIN, self.y + LINE + 4
            c.box(x, self.y, 14, 12, pair, radius=3)
            c.text(x + 20, self.y + 10, label, size=SMALL)
            x += 36 + width_of(label, SMALL)
        self.y += 14 + LINE
        c.text(MARGIN, self.y, f"{residual_words(self.arch)}; norm is {norm_label(config)}; figures are per layer", size=SMALL, fill=MUTED)
        self.y += GAP

    def arrive(self, top: float, bottom: float) -> None:
        """Connect the stream from an element spanning [top, bottom] up to the one above it."""
        self.c.line([(self.cx, top), (self.cx, self.above)])
        self.above = bottom

    def stream_box(self, title: str, lines: list[str], notes: list[str]) -> None:
        """Embedding or head: a neutral box on the stream, with figures to its right."""
        top = self.y
        height = labelled_box(self.c, self.box_x, top, BOX_W, title, lines, NEUTRAL)
        for k, note in enumerate(notes):
            self.c.text(self.note_x, top + 5 + TITLE + LINE * k, note, size=SMALL, fill=MUTED)
        self.arrive(top, top + height)
        self.y = top + height

    def place(self, items: tuple[Item, ...], level: int) -> None:
        """Draw items from the last down to the first; a repeat group gets a bracket at its nesting level."""
        for item in reversed(items):
            if isinstance(item, Repeated):
                start = self.y + GAP
                self.place(item.items, level + 1)
                x = MARGIN + (level + 1) * BRACKET_W - 14
                with self.c.group(class_="repeat", data_count=str(item.count)):
                    self.c.add("path", d=f"M{num(x + 8)} {num(start)} H{num(x)} V{num(self.y)} H{num(x + 8)}",
                               fill="none", stroke=MUTED, stroke_width=1.6)
                    self.c.text(x - 6, (start + self.y) / 2 + 5, f"×{item.count}", size=15, bold=True, anchor="end")
            else:
                self.y += GAP
                self.block(item)

    def block(self, block: Block) -> None:
        """One layer block, with its data for tools and a tooltip with the exact figures."""
        layer, report = self.arch.layers[block.index], self.analysis.layers[block.index]
        data = {
            "class_": "block",
            "data_layers": " ".join(map(str, block.indices)),
            **{f"data_{slot}": call.name for slot, call in layer.sublayers},
            "data_residual": layer.residual.name,
            "data_params": str(report.params),
            "data_params_active": str(report.params_active),
            "data_flops_per_token_fwd": repr(report.flops_per_token_fwd),
            "data_cache_bytes_per_token": repr(report.cache_bytes_per_token),
            **({"data_state_bytes": repr(report.state_bytes)} if report.state_bytes else {}),
        }
        calls = "\n".join(str(call) for call in layer.calls())
        tooltip = (f"{layer_span(block.indices)}\n{calls}\nparams {report.params:,} (active {report.params_active:,})\n"
                   f"forward FLOPs/token {report.flops_per_token_fwd:,.0f}\ncache bytes/token {report.cache_bytes_per_token:,.1f}"
                   + (f"\nstate bytes/sequence {report.state_bytes:,.0f}" if report.state_bytes else ""))
        top = self.y
        rows = [(layer_span(block.indices), INK)] + [(text, MUTED) for text in figures(report)]
        with self.c.group(tooltip, **data):
            height = self.detailed_block(layer, top) if self.detailed else self.row_block(layer, top, LINE * len(rows) + 8)
            first = top + height / 2 - LINE * len(rows) / 2 + LINE - 3
            for k, (text, colour) in enumerate(rows):
                self.c.text(self.note_x, first + LINE * k, text, size=SMALL, fill=colour)
        self.arrive(top, top + height)
        self.y = top + height

    def component(self, call: Call, x: float, y: float, width: float) -> float:
        """A sublayer's component box in its kind's colour; returns its height."""
        with self.c.group(class_=REGISTRY[call.name].kind, data_kind=call.name):
            tag = f" · {family(call)}" if self.detailed else ""
            lines = component_lines(call, self.config, width, detailed=self.detailed)  # rows leave the heads to the title
            return labelled_box(self.c, x, y, width, call.name, lines, self.palette[call.name], tag)

    def component_height(self, call: Call) -> float:
        """Height of a full-width component box in the detailed view."""
        return box_height(component_lines(call, self.config, BOX_W))

    def detailed_block(self, layer: Layer, top: float) -> float:
        """The layer's sublayers, each on its residual branch, the first at the bottom; returns the block's height."""
        pictures = {slot: site_picture(self.arch, layer, slot) for slot, _ in layer.sublayers}
        height = 8 + sum(SUBLAYER_H + PART_H * sum(map(len, pictures[slot])) + self.component_height(call) for slot, call in layer.sublayers)
        self.c.box(self.x0, top, FRAME_W, height, ("#fafafa", FRAME), radius=10)
        bottom = top + height
        for slot, call in layer.sublayers:
            bottom = self.sublayer(call, *pictures[slot], bottom)
        self.c.line([(self.cx, bottom), (self.cx, top)], arrow=False)
        return height

    def part(self, label: str, bottom: float) -> float:
        """A norm on the branch, drawn above `bottom` and joined to it; returns its top."""
        c, cx = self.c, self.cx
        top = bottom - PART_H
        c.box(self.box_x + 70, top, BOX_W - 140, NORM_H, NEUTRAL, radius=4)
        c.text(cx, top + 12, label, size=SMALL - 1, anchor="middle")
        c.line([(cx, bottom), (cx, top + NORM_H)])
        return top

    def sublayer(self, call: Call, before: list[str], after: list[str], bottom: float) -> float:
        """Branch, the norms before the component, the component, the norms after it and the residual add, drawn
        upward from `bottom`; returns the top."""
        c, cx = self.c, self.cx
        branch = bottom - 8
        c.line([(cx, bottom), (cx, branch)], arrow=False)
        c.add("circle", cx=cx, cy=branch, r=2.5, fill=STREAM)
        y = branch
        for label in before:
            y = self.part(label, y)
        height = self.component_height(call)
        box_top = y - 8 - height
        self.component(call, self.box_x, box_top, BOX_W)
        c.line([(cx, y), (cx, box_top + height)])
        y = box_top
        for label in after:
            y = self.part(label, y)
        add = y - 10 - ADD_R
        c.add("circle", cx=cx, cy=add, r=ADD_R, fill="#ffffff", stroke=STREAM, stroke_width=1.3)
        c.add("path", d=f"M{num(cx - 4.5)} {num(add)} H{num(cx + 4.5)} M{num(cx)} {num(add - 4.5)} V{num(add + 4.5)}", stroke=STREAM, stroke_width=1.3)
        c.line([(cx, y), (cx, add + ADD_R)])
        skip = self.x0 + SKIP_W / 2
        c.line([(cx, branch), (skip, branch), (skip, add), (cx - ADD_R, add)])
        return add - ADD_R

    def row_block(self, layer: Layer, top: float, minimum: float) -> float:
        """The sublayers side by side in one row (for stacks of many distinct blocks); returns the height."""
        count = len(layer.sublayers)
        width = (BOX_W - 16 * (count - 1)) / count
        height = max(minimum, 16 + max(box_height(component_lines(call, self.config, width, detailed=False)) for call in layer.calls()))
        self.c.box(self.x0, top, FRAME_W, height, ("#fafafa", FRAME), radius=8)
        for k, call in enumerate(layer.calls()):
            x = self.box_x + k * (width + 16)
            self.component(call, x, top + 8, width)
            if k:
                self.c.line([(x - 16, top + height / 2), (x, top + height / 2)])
        return height


def stack_svg(name: str, notes: list[str], arch: Arch, analysis: Analysis, items: tuple[Item, ...]) -> str:
    """The layer stack as an SVG document, bottom to top."""
    return StackDrawing(arch, analysis, items).draw(name, notes)


NODE_W, NODE_H, RANK_GAP, COLUMN_GAP = 300, 34, 14, 40
GUTTER = 96  # left of the first column: layer labels and the arcs of skip edges
FAN_OUT = 3  # a node feeding more nodes than this is named at each of them instead of drawing its edges


def ranks(graph: nx.DiGraph) -> dict[str, int]:
    """Longest-path layering from the inputs; a node without inputs sits just above its first user."""
    rank: dict[str, int] = {}
    for node in graph.nodes:  # the fx order is topological
        rank[node] = max((rank[p] + 1 for p in graph.predecessors(node)), default=0)
    for node in graph.nodes:
        if graph.in_degree(node) == 0 and graph.out_degree(node):
            rank[node] = min(rank[s] for s in graph.successors(node)) - 1
    return rank


def columns(graph: nx.DiGraph, rank: dict[str, int]) -> dict[str, int]:
    """Column 0 is the longest path (the residual stream); every other node stays near its first input's column."""
    import networkx  # on drawing only (see text.new_graph)

    column = {node: 0 for node in networkx.dag_longest_path(graph)}
    taken = {(rank[node], 0) for node in column}
    for node in sorted(graph.nodes, key=lambda n: rank[n]):  # stable: the fx order within a rank
        if node in column:
            continue
        preferred = column.get(next(iter(graph.predecessors(node)), None), 0)
        choice = next(c for step in itertools.count() for c in (preferred + step, preferred - step) if (rank[node], c) not in taken)
        column[node] = choice
        taken.add((rank[node], choice))
    return column


def network_svg(network: Network, title: str, notes: list[str]) -> str:
    """A top-down network (the fx graph) in ranks, a band per cluster, skip edges arcing on the left."""
    graph, c = network.graph, Canvas()
    rank = ranks(graph)
    column = columns(graph, rank)
    left = min(column.values())
    fans = {node for node in graph.nodes if graph.out_degree(node) > FAN_OUT}
    width = GUTTER + (max(column.values()) - left + 1) * (NODE_W + COLUMN_GAP) + MARGIN
    y = MARGIN + 16
    c.text(MARGIN, y, title, size=16, bold=True)
    for line in notes:
        y += LINE + 2
        c.text(MARGIN, y, line, fill=MUTED)
    top = y + 20 - min(rank.values()) * (NODE_H + RANK_GAP)

    def box(node: str) -> tuple[float, float]:
        return GUTTER + (column[node] - left) * (NODE_W + COLUMN_GAP), top + rank[node] * (NODE_H + RANK_GAP)

    bands: dict[str, list[float]] = {}
    for node, clusters in graph.nodes(data="clusters"):
        if clusters:
            span = bands.setdefault(clusters[0], [math.inf, -math.inf])
            span[0], span[1] = min(span[0], box(node)[1]), max(span[1], box(node)[1] + NODE_H)
    for k, (cluster, (upper, lower)) in enumerate(bands.items()):
        c.add("rect", x=MARGIN - 8, y=upper - RANK_GAP / 2, width=width - 2 * MARGIN + 16, height=lower - upper + RANK_GAP,
              fill="#f6f7f9" if k % 2 == 0 else "#ffffff")
        c.text(MARGIN, upper + 14, network.clusters[cluster][0], size=SMALL, bold=True, fill=MUTED)
    for source, target in graph.edges:
        if source in fans:
            continue
        (sx, sy), (tx, ty) = box(source), box(target)
        x1, y1, x2, y2 = sx + NODE_W / 2, sy + NODE_H, tx + NODE_W / 2, ty
        if rank[target] - rank[source] == 1:
            d = f"M{num(x1)} {num(y1)} C{num(x1)} {num((y1 + y2) / 2)} {num(x2)} {num((y1 + y2) / 2)} {num(x2)} {num(y2)}"
        elif column[source] == column[target]:  # a skip edge arcs on the left
            bend = sx - 22 - 4 * min(rank[target] - rank[source], 6)
            d = f"M{num(sx)} {num(sy + NODE_H / 2)} C{num(bend)} {num(sy + NODE_H / 2)} {num(bend)} {num(ty + NODE_H / 2)} {num(tx)} {num(ty + NODE_H / 2)}"
        else:  # a long edge runs down the free lane between two columns
            lane = GUTTER + (min(column[source], column[target]) - left + 1) * (NODE_W + COLUMN_GAP) - COLUMN_GAP / 2
            d = f"M{num(x1)} {num(y1)} V{num(y1 + RANK_GAP / 2)} H{num(lane)} V{num(y2 - RANK_GAP / 2)} H{num(x2)} V{num(y2)}"
        c.add("path", d=d, fill="none", stroke=STREAM, stroke_width=1.2, marker_end="url(#arrow)")
    for node, attrs in graph.nodes(data=True):
        x, y = box(node)
        with c.group(class_="node", data_name=node):
            c.box(x, y, NODE_W, NODE_H, attrs["pair"], radius=5)
            inputs = [p for p in graph.predecessors(node) if p in fans]
            fan = f"  ← {', '.join(inputs)}" if inputs else f"  → {graph.out_degree(node)} nodes" if node in fans else ""
            c.add("text", f'<tspan font-weight="bold">{escape(attrs["lines"][0])}</tspan><tspan fill="{MUTED}">{escape(fan)}</tspan>',
                  x=x + 8, y=y + 14, font_size=TEXT, fill=INK)
            c.text(x + 8, y + 28, attrs["lines"][1], size=SMALL, fill=MUTED)
    return c.svg(width, max(box(node)[1] for node in graph.nodes) + NODE_H + MARGIN)
