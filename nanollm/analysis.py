"""Static analysis of a meta-device model: shapes, parameters, FLOPs (fvcore), inference cache, activations.

FLOPs are counted by fvcore's FlopCountAnalysis, one traced call per distinct (what the module was built
from, input shapes): identical layers are traced once. What a module was built from is recorded by lowering
(its IR call and the settings), so no module has to describe itself for the memo to be right. fvcore counts multiply-accumulates; everything reported here is
FLOPs = 2 x MACs, the convention of C = 6ND. Components register handles for ops fvcore lacks
(attention counts only the (query, key) pairs really attended; grouped expert matmuls count only
the routed rows). Every pass runs under nanollm.shapes.MetaShapes, which gives the common ops their meta outputs
without torch's Python meta kernels (and the sympy and torch._dynamo imports they make).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .cache import cache_dir
from .compiler import layer_of
from .components import Component
from .ir import Arch
from .shapes import MetaShapes

CACHE_BYTES = 2  # bf16 cache entries
_MACS: dict[tuple, int] = {}  # fvcore counts by call key, shared by every analysis in the process


@dataclass
class LayerReport:
    """Per-layer figures."""

    index: int
    residual: str
    calls: dict[str, str]  # slot -> the call with every argument
    params: int
    params_active: int
    flops_per_token_fwd: float
    cache_bytes_per_token: float
    state_bytes: float  # recurrent state of one sequence, whatever its length

    def to_json(self) -> dict[str, Any]:
        """Plain data: the slots' calls as keys of their own (`mixer`, `ffn`), beside the figures."""
        figures = {k: v for k, v in asdict(self).items() if k not in ("index", "residual", "calls")}
        return {"index": self.index, "residual": self.residual, **self.calls, **figures}


@dataclass
class Analysis:
    """Whole-model figures at one sequence length (batch 1)."""

    seq_len: int
    n_layers: int
    params_total: int
    params_active: int
    params_embedding: int
    params_memory: int  # lookup tables a token reads a few rows of (Engram): in params_total, outside params_active
    flops_per_token_fwd: float
    flops_per_token_train: float
    cache_bytes_per_token: float
    state_bytes: float
    activation_bytes: int
    layers: list[LayerReport]

    def to_json(self) -> dict[str, Any]:
        """Plain-data form (the `nanollm compile --json` schema)."""
        return {**{k: v for k, v in asdict(self).items() if k != "layers"}, "layers": [r.to_json() for r in self.layers]}


@dataclass
class InferenceView:
    """Inference figures of one sequence (batch 1) at a context: prefilling it, then decoding the next token."""

    context: int
    prefill_flops: float  # the forward pass over `context` prompt tokens
    decode_flops_per_token: float  # one token decoded after `context` cached ones
    cache_bytes: float  # the state every layer keeps after `context` tokens (bf16)

    def to_json(self) -> dict[str, Any]:
        """Plain-data form (the `inference` object of `nanollm compile --context N --json`)."""
        return asdict(self)


def inference_view(arch: Arch, model: fx.GraphModule, prefill: Analysis, longer: Analysis) -> InferenceView:
    """The inference view at context C from the analyses at C and C + 1 tokens.

    A decoding step after C cached tokens does exactly the work the forward pass over C + 1 tokens does beyond
    the pass over C: every op is per token or causal, so position C's work is that difference (its queries
    against the C + 1 keys it sees, or its window's).
    """
    context = prefill.seq_len
    assert longer.seq_len == context + 1
    total = prefill.flops_per_token_fwd * context
    components = [model.get_submodule(f"layers.{i}.{slot}") for i, layer in enumerate(arch.layers) for slot, _ in layer.sublayers]
    return InferenceView(context, total, longer.flops_per_token_fwd * (context + 1) - total,
                         CACHE_BYTES * sum(c.cache_elements(context) for c in components))


class _Call(nn.Module):
    """Wraps a graph's call_function node so fvcore can trace it as a module."""

    def __init__(self, function: Callable, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.function, self.kwargs = function, kwargs

    def forward(self, *args: torch.Tensor) -> Any:
        return self.function(*args, **self.kwargs)


def output_shape(value: Any) -> Any:
    """A node's output shape: a tuple, a tuple of them for a node that returns several, or None."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return tuple(output_shape(v) for v in value) if isinstance(value, (tuple, list)) else None


def shape_key(values: Any) -> tuple:
    """Hashable shapes/dtypes of a call's arguments."""
    return tuple((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v) for v in values)


def module_key(node: fx.Node, module: nn.Module) -> Any:
    """What a module's outputs and FLOPs depend on besides its inputs: what lowering built it from, or (for a
    module lowering did not record) the module itself, so nothing is reused by mistake."""
    built_from = node.meta.get("built_from")
    return built_from if built_from is not None else id(module)


class _Recorder(fx.Interpreter):
    """Runs the graph on meta tensors: each call's inputs, the bytes autograd saves, and every node's output
    shape (kept in `node.meta["shapes"][seq_len]`, which the graph diagram reads).

    A call identical to an earlier one (a module built from the same call and settings, the same input
    shapes) is not run again: its output and saved bytes are reused, so a stack of identical layers costs one.
    """

    def __init__(self, model: fx.GraphModule, seq_len: int) -> None:
        super().__init__(model)
        self.seq_len = seq_len
        self.calls: list[tuple[fx.Node, tuple, dict, tuple]] = []  # (node, tensor args, kwargs, call key)
        self.memo: dict[tuple, tuple[Any, int]] = {}
        self.activation_bytes = 0
        self._saved: dict[int, int] = {}
        # Backward keeps weights too, often as views (linear saves weight.t()): known by their storage.
        self._weights = {p.untyped_storage()._cdata for p in model.parameters()}

    def key(self, node: fx.Node, args: tuple, kwargs: dict) -> tuple:
        """What determines a call's output shapes and FLOPs."""
        if node.op == "call_module":
            return (module_key(node, self.module.get_submodule(node.target)), shape_key(args))
        return (node.target, shape_key(args), shape_key(kwargs.values()))

    def run_node(self, node: fx.Node) -> Any:
        output = self.run_call(node)
        node.meta.setdefault("shapes", {})[self.seq_len] = output_shape(output)
        return output

    def run_call(self, node: fx.Node) -> Any:
        """A node's output; a call identical to an earlier one reuses its output and saved bytes."""
        if node.op not in ("call_module", "call_function"):
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        if not all(isinstance(a, torch.Tensor) for a in args):
            return super().run_node(node)  # tuple indexing and other plumbing
        key = self.key(node, args, kwargs)
        if key not in self.memo:
            self._saved = {}
            output = super().run_node(node)
            self.memo[key] = (output, sum(self._saved.values()))
        output, saved = self.memo[key]
        self.calls.append((node, args, kwargs, key))
        self.activation_bytes += saved
        return output

    def save(self, tensor: torch.Tensor) -> torch.Tensor:
        """saved_tensors_hooks pack hook: note each saved activation storage once per call."""
        storage = tensor.untyped_storage()
        # On meta, SDPA runs its math decomposition and saves (T, T) score matrices; the fused kernels
        # a real run uses never keep them, so they are left out of the estimate.
        scores = tensor.dim() >= 2 and tuple(tensor.shape[-2:]) == (self.seq_len, self.seq_len)
        if not (storage._cdata in self._weights or scores):
            self._saved[storage._cdata] = storage.nbytes()
        return tensor


def count_macs(module: nn.Module, args: tuple, handles: dict[str, Callable]) -> int:
    """Multiply-accumulates of one forward call, counted by fvcore (torch.jit trace)."""
    # Imported here: an analysis read back from the cache never needs fvcore.
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings(), MetaShapes():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(module, args).set_op_handle(**handles)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return int(analysis.total())


def analyze(arch: Arch, model: fx.GraphModule, seq_len: int) -> Analysis:
    """Analyse a meta-device model built from `arch` for one sequence of `seq_len` tokens (batch 1)."""
    recorder = _Recorder(model, seq_len)
    with torch.autograd.graph.saved_tensors_hooks(recorder.save, lambda t: t), MetaShapes():
        recorder.run(torch.zeros(1, seq_len, dtype=torch.long, device="meta"))

    node_macs: dict[str, int] = {}
    for node, args, kwargs, key in recorder.calls:
        if key not in _MACS:
            if node.op == "call_module":
                module = model.get_submodule(node.target)
                handles = module.flop_handles(seq_len) if isinstance(module, Component) else {}
            else:
                module, handles = _Call(node.target, kwargs), {}
            _MACS[key] = count_macs(module, args, handles)
        node_macs[node.name] = _MACS[key]

    layer_macs = [0] * len(arch.layers)
    for node, *_ in recorder.calls:
        index = layer_of(str(node.target)) if node.op == "call_module" else None
        if index is not None:
            layer_macs[index] += node_macs.get(node.name, 0)

    cache_bytes = CACHE_BYTES / seq_len
    layers = []
    for i, spec in enumerate(arch.layers):
        block = model.get_submodule(f"layers.{i}")
        components = [block.get_submodule(slot) for slot, _ in spec.sublayers]
        params = sum(p.numel() for p in block.parameters())
        inactive = sum(sum(p.numel() for p in c.parameters()) - c.active_params() for c in components)
        cache = sum(c.cache_elements(seq_len) for c in components if not c.fixed_state) * cache_bytes
        state = sum(c.cache_elements(seq_len) for c in components if c.fixed_state) * CACHE_BYTES
        calls = {slot: str(call) for slot, call in spec.sublayers}
        layers.append(LayerReport(i, str(spec.residual), calls, params, params - inactive, 2 * layer_macs[i] / seq_len, cache, state))

    params_total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel() + (0 if arch.config.tie_embeddings else model.lm_head.weight.numel())
    flops_fwd = 2 * sum(node_macs.values()) / seq_len
    return Analysis(
        seq_len=seq_len,
        n_layers=len(arch.layers),
        params_total=params_total,
        params_active=params_total - sum(r.params - r.params_active for r in layers),
        params_embedding=embedding,
        params_memory=sum(module.memory_params() for module in model.modules() if isinstance(module, Component)),
        flops_per_token_fwd=flops_fwd,
        flops_per_token_train=3 * flops_fwd,
        cache_bytes_per_token=sum(r.cache_bytes_per_token for r in layers),
        state_bytes=sum(r.state_bytes for r in layers),
        activation_bytes=recorder.activation_bytes,
        layers=layers,
    )


def analysis_key(arch: Arch, model: fx.GraphModule, seq_len: int) -> str | None:
    """A digest of everything an analysis depends on: the architecture, the graph, what each module was built from,
    every parameter's shape, the source of nanollm and of every module class in the model, torch's and fvcore's versions
    (None when a module's class has no source file to digest)."""
    digest = hashlib.sha256()
    for part in (repr(arch), model.code, str(seq_len), torch.__version__, importlib.metadata.version("fvcore")):
        digest.update(part.encode() + b"\0")
    for node in model.graph.nodes:
        digest.update(f"{node.name}:{node.meta.get('built_from')!r}\0".encode())
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\0".encode())
    sources = set(Path(__file__).parent.rglob("*.py"))
    for kind in {type(module) for module in model.modules()}:  # each class once, not each of its (many) instances
        try:
            sources.add(Path(inspect.getsourcefile(kind)))
        except (TypeError, OSError):  # a class without a source file (defined in a notebook): its code cannot be keyed
            return None
    for path in sorted(sources):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def stored_analysis(arch: Arch, model: fx.GraphModule, seq_len: int) -> Analysis:
    """`analyze`, kept in nanollm's cache folder: an architecture analysed before, by the same code, is read back.

    Reading back spares the pass over the graph, fvcore's import and its traces (and, for a model with an op
    nanollm.shapes has no rule for, the imports torch's Python meta kernels make). Set NANOLLM_ANALYSIS_CACHE=0 to
    always count afresh.
    """
    key = None if os.environ.get("NANOLLM_ANALYSIS_CACHE") == "0" else analysis_key(arch, model, seq_len)
    if key is None:
        return analyze(arch, model, seq_len)
    path = cache_dir() / "analyses" / f"{key}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return Analysis(**{**data, "layers": [LayerReport(**layer) for layer in data["layers"]]})
    analysis = analyze(arch, model, seq_len)
    partial = path.with_suffix(f".{os.getpid()}.tmp")  # written whole, then renamed: a concurrent reader never sees half a file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(asdict(analysis)))
        partial.replace(path)
    except OSError:  # a read-only cache folder: the figures are right, only not kept
        pass
    return analysis
