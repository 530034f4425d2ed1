"""Lowering: the IR -> a torch.fx GraphModule whose nodes are component calls."""
from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .components import INIT_STD, REGISTRY, Component
from .components.norm.rmsnorm import RMSNorm
from .components.position.rope import RotaryEmbedding
from .ir import Arch, Call, ModelConfig

ANALYSIS_DTYPE = torch.bfloat16  # the meta graph is typed as a GPU run would be: sizes, KV cache, activations


def make_component(call: Call, config: ModelConfig) -> Component:
    """Instantiate the registered module for a resolved call."""
    return REGISTRY[call.name].module(config, **call.kwargs())


def lower(arch: Arch, device: torch.device | str = "meta", dtype: torch.dtype = ANALYSIS_DTYPE) -> fx.GraphModule:
    """Build the model's modules on `device` and the fx graph that wires them; forward(input_ids) -> (logits, aux_loss)."""
    config = arch.config
    root = nn.Module()
    with torch.device(device):
        # Passing the weight skips nn.Embedding's normal_ init, whose meta kernel imports torch._dynamo (~2 s).
        root.embed = nn.Embedding(config.vocab_size, config.d_model, _weight=torch.empty(config.vocab_size, config.d_model))
        root.rope = RotaryEmbedding(config.head_dim, config.rope_theta)
        root.layers = nn.ModuleList()
        for layer in arch.layers:
            block = nn.Module()
            block.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
            block.mixer = make_component(layer.mixer, config)
            block.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
            block.ffn = make_component(layer.ffn, config)
            root.layers.append(block)
        root.norm = RMSNorm(config.d_model, config.norm_eps)
        if not config.tie_embeddings:
            root.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
    root.to(dtype)

    graph = fx.Graph()

    def node(op: str, target: object, args: tuple, name: str) -> fx.Node:
        return graph.create_node(op, target, args, name=name)

    input_ids = graph.placeholder("input_ids")
    h = node("call_module", "embed", (input_ids,), "embed")
    rope = node("call_module", "rope", (input_ids,), "rope")
    cos, sin = (node("call_function", operator.getitem, (rope, i), name) for i, name in enumerate(("cos", "sin")))
    aux_loss = None
    for i, block in enumerate(root.layers):
        for slot in ("mixer", "ffn"):
            component: Component = getattr(block, slot)
            prefix = f"layers_{i}_{slot}"
            x = node("call_module", f"layers.{i}.{slot}_norm", (h,), f"{prefix}_norm")
            out = node("call_module", f"layers.{i}.{slot}", (x, cos, sin) if component.uses_rope else (x,), prefix)
            if component.returns_aux:
                aux = node("call_function", operator.getitem, (out, 1), f"{prefix}_aux")
                aux_loss = aux if aux_loss is None else node("call_function", operator.add, (aux_loss, aux), "aux_loss")
                out = node("call_function", operator.getitem, (out, 0), f"{prefix}_out")
            h = node("call_function", operator.add, (h, out), f"{prefix}_residual")
    h = node("call_module", "norm", (h,), "norm")
    if config.tie_embeddings:
        embed_weight = node("get_attr", "embed.weight", (), "embed_weight")
        logits = node("call_function", F.linear, (h, embed_weight), "lm_head")
    else:
        logits = node("call_module", "lm_head", (h,), "lm_head")
    if aux_loss is None:
        aux_loss = node("call_method", "new_zeros", (logits, ()), "aux_loss")
    graph.output((logits, aux_loss))
    return fx.GraphModule(root, graph, class_name="NanoLLM")


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
    """Normal(0, INIT_STD) matrices; components and norms reset their own parameters (and only those)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=INIT_STD)
    elif hasattr(module, "reset_parameters"):
        module.reset_parameters()
