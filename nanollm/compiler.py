"""Lowering: the IR -> a torch.fx GraphModule whose nodes are component calls.

The graph reads as the architecture: the embedding, then per layer and sublayer the residual scheme's entry
nodes (a norm, say), the component called with the inputs it declared (the branch input, rotary tables,
token ids, positions), the scheme's exit nodes (a norm, the residual add), then the final norm and the head.
This module owns the naming convention: a sublayer's modules are `layers.<i>.<slot>[_<part>]`, its nodes
`layers_<i>_<slot>[_<part>]`; `layer_of` reads the layer index back.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import operator
import re
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .components import BRANCH, INIT_STD, POSITIONS, REGISTRY, TABLE, TOKEN_IDS, Component, Residual, Rotary, make_norm
from .ir import Arch, Call, ModelConfig

ANALYSIS_DTYPE = torch.bfloat16  # the meta graph is typed as a GPU run would be: sizes, KV cache, activations
LAYER = re.compile(r"^layers[._](\d+)(?:[._]|$)")


def layer_of(name: str) -> int | None:
    """The layer index of a module path (`layers.3.ffn`) or node name (`layers_3_ffn`), or None outside the layers."""
    match = LAYER.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Site:
    """Where a sublayer sits: layer `layer`, slot `slot`; names its modules and nodes."""

    layer: int
    slot: str

    def module(self, part: str | None = None) -> str:
        """Module path of the component (part None) or of one of its site's parts (`norm`, `post_norm`, ...)."""
        return f"layers.{self.layer}.{self.slot}" + (f"_{part}" if part else "")

    def node(self, part: str | None = None) -> str:
        """Graph node name of the component's call (part None) or of one of its site's nodes."""
        return f"layers_{self.layer}_{self.slot}" + (f"_{part}" if part else "")


class Unembedding(nn.Linear):
    """An untied LM head: the vocabulary's matrix, an embedding-like table for the optimisers."""

    def param_roles(self) -> dict[str, str]:
        return {"weight": TABLE}


def scale_embedding(hidden: torch.Tensor) -> torch.Tensor:
    """Embeddings times sqrt(d_model), the factor rounded to their dtype first, as Gemma does."""
    return hidden * torch.tensor(math.sqrt(hidden.shape[-1]), dtype=hidden.dtype)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap)."""
    return cap * torch.tanh(logits / cap)


def token_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Positions 0..T-1 of a batch of token ids."""
    return torch.arange(input_ids.shape[-1], device=input_ids.device)


class Lowering:
    """The graph under construction, and what each call_module node was built from (`node.meta["built_from"]`,
    which the analysis reuses work by)."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.built_from: dict[str, Hashable] = {}  # module path -> what determines its outputs and FLOPs

    def module(self, target: str, args: tuple, name: str) -> fx.Node:
        """A call_module node."""
        node = self.graph.create_node("call_module", target, args, name=name)
        node.meta["built_from"] = self.built_from.get(target)
        return node

    def call(self, site: Site, part: str | None, args: tuple) -> fx.Node:
        """A call_module node of a sublayer's component (part None) or of one of its site's parts."""
        return self.module(site.module(part), args, site.node(part))

    def function(self, target: Callable, args: tuple, name: str) -> fx.Node:
        """A call_function node."""
        return self.graph.create_node("call_function", target, args, name=name)

    def add(self, a: fx.Node, b: fx.Node, name: str) -> fx.Node:
        """a + b."""
        return self.function(operator.add, (a, b), name)

    def item(self, node: fx.Node, index: int, name: str) -> fx.Node:
        """node[index]."""
        return self.function(operator.getitem, (node, index), name)


def make_component(call: Call, config: ModelConfig) -> Component | Residual:
    """Instantiate the registered class of a resolved call built from the settings: a sublayer or a residual scheme."""
    return REGISTRY[call.name].module(config, **call.kwargs())


def make_table(rotary: Rotary) -> nn.Module:
    """The module computing a position encoding's tables for heads of a width."""
    return REGISTRY[rotary.position.name].module(rotary.head_dim, **rotary.position.kwargs())


@contextlib.contextmanager
def without_init() -> Iterator[None]:
    """torch.nn.init's functions as no-ops: modules built on the meta device skip the initialisation a build redoes
    anyway (`materialize`), which on meta runs slow decompositions and first imports torch._dynamo (~2 s)."""
    names = [name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def residual_schemes(arch: Arch) -> dict[Call, Residual]:
    """One instance of each residual scheme the model and its layers name."""
    return {call: make_component(call, arch.config) for call in {arch.config.residual, *(layer.residual for layer in arch.layers)}}


def lower(arch: Arch) -> fx.GraphModule:
    """Build the model's modules on the meta device and the fx graph that wires them; forward(input_ids) -> (logits, aux_loss)."""
    config = arch.config
    # What a module's outputs and FLOPs depend on besides its input shapes: its call and the settings (the
    # layer count never matters to one layer).
    settings = dataclasses.replace(config, n_layers=1)
    root = nn.Module()
    g = Lowering()
    schemes = residual_schemes(arch)
    with torch.device("meta"), without_init():
        root.embed = nn.Embedding(config.vocab_size, config.d_model)
        g.built_from["embed"] = ("embed", config.vocab_size, config.d_model)
        root.layers = nn.ModuleList()
        for i, layer in enumerate(arch.layers):
            block = nn.Module()
            for slot, call in layer.sublayers:
                site = Site(i, slot)
                for part, module in schemes[layer.residual].site_modules(site).items():
                    block.add_module(f"{slot}_{part}", module)
                    g.built_from[site.module(part)] = (layer.residual, slot, part, settings)
                block.add_module(slot, make_component(call, config))
                g.built_from[site.module()] = (call, settings)
            root.layers.append(block)
        for rotary, name in table_names(root, arch).items():
            root.add_module(name, make_table(rotary))
            g.built_from[name] = rotary
        for name, module in schemes[config.residual].model_modules().items():
            root.add_module(name, module)
            g.built_from[name] = (config.residual, name, settings)
        root.norm = make_norm(config, config.d_model)
        g.built_from["norm"] = (config.norm, config.norm_eps, config.d_model)
        if not config.tie_embeddings:
            root.lm_head = Unembedding(config.d_model, config.vocab_size, bias=False)
            g.built_from["lm_head"] = ("lm_head", config.d_model, config.vocab_size)
    root.to(ANALYSIS_DTYPE)

    input_ids = g.graph.placeholder("input_ids")
    positions = g.function(token_positions, (input_ids,), "positions")
    logits, aux_loss = wire(g, root, arch, input_ids, positions, lambda site, args: g.call(site, None, args))
    if aux_loss is None:
        aux_loss = g.graph.create_node("call_method", "new_zeros", (logits, ()), name="aux_loss")
    g.graph.output((logits, aux_loss))
    return fx.GraphModule(root, g.graph, class_name="NanoLLM")


def table_names(root: nn.Module, arch: Arch) -> dict[Rotary, str]:
    """The module name of each position table the components declare, in the order they first ask for it."""
    tables: dict[Rotary, str] = {}
    for i, layer in enumerate(arch.layers):
        for slot, _ in layer.sublayers:
            for rotary in root.get_submodule(Site(i, slot).module()).inputs():
                if isinstance(rotary, Rotary) and rotary not in tables:
                    tables[rotary] = "rope" if not tables else f"rope_{len(tables)}"
    return tables


def wire(g: Lowering, root: nn.Module, arch: Arch, input_ids: fx.Node, positions: fx.Node,
         call_sublayer: Callable[[Site, tuple], fx.Node]) -> tuple[fx.Node, fx.Node | None]:
    """Emit the model's nodes from the token ids and their positions to the logits: (logits, summed aux losses or None).

    `call_sublayer(site, args)` emits the node of one sublayer's component given its declared inputs: training
    calls its forward, decoding (decode.py) its `decode` with its state.
    """
    config = arch.config
    schemes = residual_schemes(arch)
    hidden = g.module("embed", (input_ids,), "embed")
    if config.embed_scale:
        hidden = g.function(scale_embedding, (hidden,), "embed_scaled")
    table_nodes = {}
    for rotary, name in table_names(root, arch).items():
        table = g.module(name, (positions,), name)
        table_nodes[rotary] = (g.item(table, 0, f"{name}_cos"), g.item(table, 1, f"{name}_sin"))
    given = {TOKEN_IDS: (input_ids,), POSITIONS: (positions,)}

    stream = schemes[config.residual].expand(g, hidden)
    aux_loss = None
    for i, layer in enumerate(arch.layers):
        scheme = schemes[layer.residual]
        for slot, _ in layer.sublayers:
            site = Site(i, slot)
            component: Component = root.get_submodule(site.module())
            x = scheme.enter(g, site, stream)
            args = [arg for wanted in component.inputs()
                    for arg in ((x,) if wanted == BRANCH else table_nodes[wanted] if isinstance(wanted, Rotary) else given[wanted])]
            out = call_sublayer(site, tuple(args))
            if component.outputs != ("out",):
                outputs = {name: g.item(out, k, site.node(name)) for k, name in enumerate(component.outputs)}
                out = outputs["out"]
                if "aux_loss" in outputs:
                    aux = outputs["aux_loss"]
                    aux_loss = aux if aux_loss is None else g.add(aux_loss, aux, "aux_loss")
            stream = scheme.leave(g, site, stream, out)
    hidden = g.module("norm", (schemes[config.residual].reduce(g, stream),), "norm")
    if config.tie_embeddings:
        embed_weight = g.graph.create_node("get_attr", "embed.weight", (), name="embed_weight")
        logits = g.function(F.linear, (hidden, embed_weight), "lm_head")
    else:
        logits = g.module("lm_head", (hidden,), "lm_head")
    if config.logit_softcap:
        logits = g.function(softcap, (logits, config.logit_softcap), "logits_softcapped")
    return logits, aux_loss


def materialize(meta_model: fx.GraphModule, device: torch.device | str, dtype: torch.dtype) -> fx.GraphModule:
    """A copy of a meta-device model with real, initialised weights on `device`."""
    model = copy.deepcopy(meta_model)
    for module in model.modules():
        materialize_own(module, device, dtype)
    return model


@torch.no_grad()
def materialize_own(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Real storage and initial values for a module's own parameters and buffers, not its children's.

    Module by module in `modules()` order, the random draws are those of a whole-model build, so a model
    materialised piecewise (FSDP, a layer at a time) gets the same weights.
    """
    # to_empty's own mechanism, casting floating-point tensors to `dtype` on the way
    module._apply(lambda t: torch.empty_like(t, device=device, dtype=dtype if t.is_floating_point() else t.dtype), recurse=False)
    initialize_own(module)


@torch.no_grad()
def initialize(model: nn.Module) -> None:
    """Initialise every module of a real model, as a build does."""
    for module in model.modules():
        initialize_own(module)


@torch.no_grad()
def initialize_own(module: nn.Module) -> None:
    """Normal(0, INIT_STD) matrices and zero biases; components and norms reset their own parameters (and only those)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif hasattr(module, "reset_parameters"):
        module.reset_parameters()

