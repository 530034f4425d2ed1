"""Diagrams as networks of labelled nodes in nested clusters, written as Graphviz DOT and Mermaid text."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import networkx as nx

NEUTRAL = ("#f1f3f4", "#80868b")  # fill and stroke of what is no component: norms, embedding, head, plumbing
CLUSTER_STROKE = "#9aa0a6"


def new_graph() -> nx.DiGraph:
    """An empty networkx graph; networkx is imported here, on drawing, not with every nanollm command."""
    import networkx

    return networkx.DiGraph()


@dataclass
class Network:
    """A diagram for the text formats and the graph view.

    Each node of `graph` has `lines` (its label), `pair` (fill, stroke), `shape` ("box", "circle" or
    "text") and `clusters` (the ids of the clusters it sits in, outermost first); each edge has `dashed`.
    """

    direction: str  # "BT": drawn bottom to top; "TB": top to bottom
    graph: nx.DiGraph = field(default_factory=new_graph)
    clusters: dict[str, list[str]] = field(default_factory=dict)  # id -> label lines

    def node(self, name: str, lines: list[str], pair: tuple[str, str] = NEUTRAL, shape: str = "box", clusters: tuple[str, ...] = ()) -> str:
        """Add a node; returns its name."""
        self.graph.add_node(name, lines=lines, pair=pair, shape=shape, clusters=clusters)
        return name

    def edge(self, source: str, target: str, dashed: bool = False) -> None:
        """Add an edge."""
        self.graph.add_edge(source, target, dashed=dashed)

    def walk(self) -> Iterator[tuple[str, str, int]]:
        """The nodes in cluster order: ("open", cluster id, depth), ("node", name, depth), ("close", cluster id, depth)."""
        tree: dict[tuple[str, ...], list[tuple[str, Any]]] = {(): []}  # cluster path -> ("node", name) / ("cluster", path)
        for name, clusters in self.graph.nodes(data="clusters"):
            for depth in range(1, len(clusters) + 1):
                if clusters[:depth] not in tree:
                    tree[clusters[:depth]] = []
                    tree[clusters[:depth - 1]].append(("cluster", clusters[:depth]))
            tree[clusters].append(("node", name))

        def contents(path: tuple[str, ...]) -> Iterator[tuple[str, str, int]]:
            for kind, entry in tree[path]:
                if kind == "node":
                    yield "node", entry, len(path)
                else:
                    yield "open", entry[-1], len(path)
                    yield from contents(entry)
                    yield "close", entry[-1], len(path)

        return contents(())


def dot_string(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def dot(network: Network) -> str:
    """Graphviz DOT source."""
    out = [
        "digraph nanollm {",
        f"  rankdir={network.direction};",
        '  graph [fontname="Helvetica", fontsize=12, labeljust=l, labelloc=b, nodesep=0.3, ranksep=0.3];',
        '  node [fontname="Helvetica", fontsize=11, shape=box, style="rounded,filled"];',
        '  edge [color="#3c4043", arrowsize=0.7];',
    ]
    for kind, entry, depth in network.walk():
        indent = "  " * (depth + 1)
        if kind == "open":
            out.append(f"{indent}subgraph {dot_string('cluster_' + entry)} {{")
            out.append(f'{indent}  label={dot_string(chr(10).join(network.clusters[entry]))}; style="rounded,dashed"; color="{CLUSTER_STROKE}";')
        elif kind == "close":
            out.append(f"{indent}}}")
        else:
            attrs = network.graph.nodes[entry]
            fill, stroke = attrs["pair"]
            style = {
                "box": f'fillcolor="{fill}", color="{stroke}"',
                "circle": f'shape=circle, width=0.3, fixedsize=true, fillcolor="#ffffff", color="{stroke}"',
                "text": "shape=plaintext, style=solid",
            }[attrs["shape"]]
            out.append(f"{indent}{dot_string(entry)} [label={dot_string(chr(10).join(attrs['lines']))}, {style}];")
    for source, target, dashed in network.graph.edges(data="dashed"):
        out.append(f"  {dot_string(source)} -> {dot_string(target)}{' [style=dashed]' if dashed else ''};")
    out.append("}")
    return "\n".join(out) + "\n"


def mermaid_text(text: str) -> str:
    """Label text safe inside Mermaid's ["..."] (entity codes for the characters it would read as syntax)."""
    for char, code in (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(char, code)
    return text


def mermaid(network: Network) -> str:
    """Mermaid flowchart source (renders in GitHub and GitLab markdown)."""
    out = [f"flowchart {network.direction}"]
    styles: dict[tuple[str, str], str] = {}
    for pair in dict.fromkeys(pair for _, pair in network.graph.nodes(data="pair")):
        styles[pair] = f"c{len(styles)}"
        out.append(f"  classDef {styles[pair]} fill:{pair[0]},stroke:{pair[1]},color:#222222")
    out.append("  classDef text fill:none,stroke:none,color:#5f6368")
    ids = {name: f"n{k}" for k, name in enumerate(network.graph.nodes)}  # Mermaid reserves words like `end`
    for kind, entry, depth in network.walk():
        indent = "  " * (depth + 1)
        if kind == "open":
            label = "<br>".join(mermaid_text(line) for line in network.clusters[entry])
            out.append(f'{indent}subgraph {entry} ["{label}"]')
        elif kind == "close":
            out.append(f"{indent}end")
        else:
            attrs = network.graph.nodes[entry]
            label = "<br>".join(mermaid_text(line) for line in attrs["lines"])
            shape = '(("{}"))' if attrs["shape"] == "circle" else '["{}"]'
            out.append(f"{indent}{ids[entry]}{shape.format(label)}")
    for source, target, dashed in network.graph.edges(data="dashed"):
        out.append(f"  {ids[source]} {'-.->' if dashed else '-->'} {ids[target]}")
    for name, attrs in network.graph.nodes(data=True):
        out.append(f"  class {ids[name]} {'text' if attrs['shape'] == 'text' else styles[attrs['pair']]}")
    return "\n".join(out) + "\n"
