"""The fx graph itself as a network: a node per graph node with its output shape, a cluster per layer."""
from __future__ import annotations

import re
from typing import Any

from torch import fx

from ..components import Component
from .stack import colours
from .text import NEUTRAL, Network

LAYER_NODE = re.compile(r"^layers_(\d+)_")  # the compiler names a layer's nodes layers_<i>_...


def operation(model: fx.GraphModule, node: fx.Node) -> tuple[str, str | None]:
    """What a node does, in a word, and its component kind (None for anything else)."""
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        return (module.spec.name, module.spec.name) if isinstance(module, Component) else (type(module).__name__, None)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)), None
    if node.op in ("call_method", "get_attr"):
        return str(node.target), None
    return node.op, None  # placeholder, output


def shape_text(shape: Any) -> str:
    """(1, 4096, 1024) -> '1×4096×1024'; a tuple of shapes in parentheses."""
    if shape is None:
        return "?"
    if all(isinstance(d, int) for d in shape):
        return "×".join(map(str, shape)) or "scalar"
    return "(" + ", ".join(shape_text(s) for s in shape) + ")"


def graph_network(model: fx.GraphModule, seq_len: int) -> Network:
    """Every node of the graph with its output shape for one sequence of `seq_len` tokens (recorded by the
    model's analysis at that length, which must have run); edges are data flow."""
    shapes = {node: node.meta["shapes"][seq_len] for node in model.graph.nodes}
    what = {node: operation(model, node) for node in model.graph.nodes}
    palette = colours([kind for _, kind in what.values() if kind is not None])
    network = Network("TB")
    for node in model.graph.nodes:
        op, kind = what[node]
        layer = LAYER_NODE.match(node.name)
        if layer:
            network.clusters[f"layer_{layer.group(1)}"] = [f"layer {layer.group(1)}"]
        network.node(node.name, [node.name, f"{op} → {shape_text(shapes[node])}"], palette.get(kind, NEUTRAL),
                     clusters=(f"layer_{layer.group(1)}",) if layer else ())
        for source in node.all_input_nodes:
            network.edge(source.name, node.name)
    return network
