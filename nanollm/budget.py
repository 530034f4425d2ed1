"""Compute-budget sizing: pick a model size and a token count whose training compute equals a budget.

A scaling law turns the budget C into a target (parameters, non-embedding FLOPs per token, ...). The
file's size family (its free sizes, or width and depth together at the file's aspect ratio) is searched
for the shape whose exact analysed figure is nearest that target, and the token count D is then set so
that D x (exact training FLOPs per token of that graph) = C.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from torch import fx

from .analysis import Analysis, analyze
from .compiler import lower
from .components import REGISTRY
from .errors import ArchError
from .ir import Arch, ModelConfig
from .memory import TrainingMemory, training_memory
from .resolve import AUTO, MAX_LAYERS, bind, convert, default_layer, merge, parse_number, read, resolve
from .syntax import Arg, ArchFile, LayerItem, LayerStmt, Repeat, Setting, Term, Value, format_file

WIDTH_MULTIPLE = 64  # d_model, d_ff and every hidden width are multiples of this
MAX_D_MODEL = 1 << 16
DEFAULT_ASPECT = 1024 / 28  # Qwen3-0.6B's d_model per layer, when a file fixes neither


# ---- laws -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What the search matches: the size whose `metric` is nearest `value`."""

    metric: str  # "params" | "non_embedding_flops" | "params_x_flops" | "flops"
    value: float


@dataclass(frozen=True)
class Chinchilla:
    """Hoffmann et al. 2022, approach 3: L(N, D) = E + A/N^alpha + B/D^beta minimised under C = 6ND (eq. 4)."""

    name: str
    A: float
    B: float
    alpha: float
    beta: float

    def optimum(self, budget: float) -> tuple[float, float]:
        """Compute-optimal parameters and tokens."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        a, b = self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)
        return g * (budget / 6) ** a, (budget / 6) ** b / g

    def target(self, budget: float) -> Target:
        return Target("params", self.optimum(budget)[0])


@dataclass(frozen=True)
class DeepSeek:
    """DeepSeek LLM 2024: M_opt = 0.1715 C^0.5243 non-embedding FLOPs/token, D_opt = 5.8316 C^0.4757."""

    name: str = "deepseek"

    def optimum(self, budget: float) -> tuple[float, float]:
        """Compute-optimal non-embedding FLOPs per token and tokens."""
        return 0.1715 * budget**0.5243, 5.8316 * budget**0.4757

    def target(self, budget: float) -> Target:
        return Target("non_embedding_flops", self.optimum(budget)[0])


@dataclass(frozen=True)
class TokensPerParam:
    """D = R x N: the size whose N x (training FLOPs per token) = C / R."""

    ratio: float

    @property
    def name(self) -> str:
        return f"tokens-per-param={self.ratio:g}"

    def target(self, budget: float) -> Target:
        return Target("params_x_flops", budget / self.ratio)


LAWS: dict[str, Any] = {
    # The approach-3 fit as re-estimated from the paper's own data by Besiroglu et al. 2024 (arXiv 2404.10102):
    # the constants printed in the paper imply ~90 tokens per parameter at Gopher's budget, at odds with
    # approaches 1 and 2 and with the paper's Table 3 (~20); this refit agrees with them.
    "chinchilla": Chinchilla("chinchilla", A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),
    # The constants as printed in Hoffmann et al. 2022: E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28.
    "chinchilla-paper": Chinchilla("chinchilla-paper", A=406.4, B=410.7, alpha=0.34, beta=0.28),
    "deepseek": DeepSeek(),
}


def parse_law(text: str) -> Any:
    """A law by name: chinchilla, chinchilla-paper, deepseek, or tokens-per-param=R."""
    if text in LAWS:
        return LAWS[text]
    match = re.fullmatch(r"tokens-per-param=([0-9.eE+-]+)", text)
    if match:
        try:
            ratio = float(match.group(1))
        except ValueError:
            ratio = 0.0
        if ratio > 0 and math.isfinite(ratio):
            return TokensPerParam(ratio)
    raise ArchError(f"unknown law '{text}': use {', '.join(LAWS)} or tokens-per-param=R (R > 0)")


# ---- the size family of a file ----------------------------------------------------------------------

Width = tuple[int, int, int]  # (n_kv_heads, n_heads, d_model)


class Family:
    """The sizes a file can take: its `auto` sizes or, when none is marked, width and depth together.

    Width: n_kv_heads grows; n_heads keeps its ratio to it and d_model its ratio to n_heads (rounded to a
    multiple of 64 that n_heads divides); d_ff and every explicit hidden width (`moe(d_ff=...)`) keep
    their ratio to d_model (multiples of 64); head_dim stays. Depth: the count of one repeat group: the
    `repeat auto` one, else the file's only top-level group, else the whole layer list made a group.
    When both are free, depth follows width at the file's aspect ratio d_model / layers.
    """

    def __init__(self, arch_file: ArchFile) -> None:
        merged = merge(arch_file)
        self.source = arch_file.source
        self.settings = {n: s for n, s in merged.settings.items() if n != "n_layers"}  # the list is the model
        self.lets = merged.lets
        layers = merged.layers or [_default_stack(merged.settings)]
        auto_width, auto_depth = _free_sizes(merged.settings, layers)
        for extra in auto_depth[1:]:
            raise ArchError("only one repeat count may be auto", extra.count.pos)
        if auto_depth and "n_layers" in merged.settings:
            raise ArchError("n_layers fixes the depth that `repeat auto` leaves free: drop one of them", merged.settings["n_layers"].pos)
        self.free_width = auto_width or not auto_depth
        self.free_depth = bool(auto_depth) or not auto_width
        if auto_depth:
            self.layers, self.depth_group = layers, auto_depth[0]
        elif len(layers) == 1 and isinstance(layers[0], Repeat):
            self.layers, self.depth_group = layers, layers[0]
        elif self.free_depth:
            self.depth_group = Repeat(Value("1", "number", None), tuple(layers), (), None)
            self.layers = [self.depth_group]
        else:
            self.layers, self.depth_group = layers, None

        # The file as written, an auto count read as 1 and an auto d_model as the baseline's width per head.
        fixed = dict(self.settings)
        if auto_width:
            heads = convert(fixed["n_heads"].value, "int", "n_heads", 1) if "n_heads" in fixed else ModelConfig.n_heads
            width = heads * (ModelConfig.d_model // ModelConfig.n_heads)
            fixed["d_model"] = Setting("d_model", Value(str(width), "number", fixed["d_model"].pos), fixed["d_model"].pos)
            if "d_ff" not in fixed:  # the baseline's d_ff is 3 x its d_model, not of this width
                d_ff = ModelConfig.d_ff * width // ModelConfig.d_model
                fixed["d_ff"] = self.settings["d_ff"] = Setting("d_ff", Value(str(d_ff), "number", None), None)
        self.reference = resolve(ArchFile(self.source, settings=list(fixed.values()))).config
        ref = self.reference
        self.reference_width: Width = (ref.n_kv_heads, ref.n_heads, ref.d_model)
        self.reference_depth = 1 if auto_depth or self.depth_group is None else int(parse_number(self.depth_group.count.text))
        one, two = (len(self.arch(self.reference_width, n).layers) for n in (1, 2))
        self.unit_layers, self.other_layers = two - one, 2 * one - two
        total = self.other_layers + self.unit_layers * self.reference_depth
        self.aspect = DEFAULT_ASPECT if (auto_width and auto_depth) else ref.d_model / total
        self.widths = self.admissible_widths() if self.free_width else [self.reference_width]
        if not self.widths:
            raise ArchError(
                f"d_model has no admissible value: no multiple of {WIDTH_MULTIPLE} up to {MAX_D_MODEL} is divisible "
                f"by n_heads at n_heads / n_kv_heads = {ref.n_heads} / {ref.n_kv_heads} and d_model / n_heads = {ref.d_model / ref.n_heads:g}",
                self.settings["d_model"].pos if "d_model" in self.settings else None,
            )

    def admissible_widths(self) -> list[Width]:
        """Every admissible (n_kv_heads, n_heads, d_model), smallest first."""
        ref = self.reference
        group, share = ref.n_heads // ref.n_kv_heads, ref.d_model / ref.n_heads
        widths: list[Width] = []
        for kv in range(1, MAX_D_MODEL):
            heads = kv * group
            d_model = max(WIDTH_MULTIPLE, round(heads * share / WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
            if d_model > MAX_D_MODEL:
                break
            if d_model % heads == 0 and (not widths or d_model > widths[-1][2]):
                widths.append((kv, heads, d_model))
        return widths

    def depth_for(self, width: Width) -> int:
        """The depth count holding the aspect ratio at this width (or the file's own when depth is fixed)."""
        if not self.free_depth:
            return self.reference_depth
        return min(self.deepest, max(1, round((width[2] / self.aspect - self.other_layers) / self.unit_layers)))

    @property
    def deepest(self) -> int:
        """The largest depth count within nanollm's layer limit."""
        return max(1, (MAX_LAYERS - self.other_layers) // self.unit_layers)

    def scaled(self, value: float, d_model: int) -> int:
        """A hidden width at its reference ratio to d_model, as a multiple of 64; a width of 0 (a part switched off) stays 0."""
        if not value:
            return 0
        return max(WIDTH_MULTIPLE, round(value * d_model / self.reference.d_model / WIDTH_MULTIPLE) * WIDTH_MULTIPLE)

    def file(self, width: Width, depth: int) -> ArchFile:
        """The concrete .arch file of one size."""
        settings, lets = dict(self.settings), dict(self.lets)
        d_model = width[2] if self.free_width else None
        if d_model is not None:
            kv, heads, _ = width
            values = {"d_model": d_model, "n_heads": heads, "n_kv_heads": kv, "d_ff": self.scaled(self.reference.d_ff, d_model)}
            for name, value in values.items():
                pos = settings[name].pos if name in settings else None
                settings[name] = Setting(name, Value(str(value), "number", pos), pos)
            lets = {name: dataclasses.replace(let, term=self.scale_term(let.term, d_model)) for name, let in lets.items()}
        layers = [self.rewrite(item, depth, d_model) for item in self.layers]
        return ArchFile(self.source, settings=list(settings.values()), lets=list(lets.values()), layers=layers)

    def rewrite(self, item: LayerItem, depth: int, d_model: int | None) -> LayerItem:
        """A layer item with the depth count set and hidden widths scaled to d_model (if given)."""
        scale = (lambda term: self.scale_term(term, d_model)) if d_model is not None else (lambda term: term)
        attrs = tuple(dataclasses.replace(a, term=scale(a.term)) for a in item.attrs)
        if isinstance(item, LayerStmt):
            return dataclasses.replace(item, mixer=scale(item.mixer), attrs=attrs)
        count = Value(str(depth), "number", item.count.pos) if item is self.depth_group else item.count
        return dataclasses.replace(item, count=count, body=tuple(self.rewrite(c, depth, d_model) for c in item.body), attrs=attrs)

    def scale_term(self, term: Term, d_model: int) -> Term:
        """A call with its explicit hidden-width arguments scaled to d_model."""
        spec = REGISTRY.get(term.name)
        if spec is None or not term.args:
            return term
        args = list(term.args)
        widths = {p.name for p in spec.params if p.width}
        for name, (index, arg) in bind(term, spec.params).items():
            if name in widths:
                keyword = arg.name or (name if term.args[index].value.kind == "name" else None)  # `d_ff2048` shorthand
                value = Value(str(self.scaled(parse_number(arg.value.text), d_model)), "number", arg.value.pos)
                args[index] = Arg(keyword, value, arg.pos)
        return dataclasses.replace(term, args=tuple(args))

    def arch(self, width: Width, depth: int) -> Arch:
        """The IR of one size."""
        return resolve(self.file(width, depth))


def validate(arch_file: ArchFile) -> None:
    """Check a file that may leave sizes free (`auto`): at its reference size if it does."""
    merged = merge(arch_file)
    auto_width, auto_depth = _free_sizes(merged.settings, merged.layers)
    if auto_width or auto_depth:
        Family(arch_file)
    else:
        resolve(arch_file)


def _default_stack(settings: dict[str, Setting]) -> Repeat:
    """`repeat n_layers < global >`, the layer list of a file that has none."""
    count = settings["n_layers"].value if "n_layers" in settings else Value(str(ModelConfig.n_layers), "number", None)
    return Repeat(count, (default_layer(),), (), None)


def _free_sizes(settings: dict[str, Setting], layers: list[LayerItem]) -> tuple[bool, list[Repeat]]:
    """Whether d_model is auto, and the repeat groups whose count is auto."""
    auto_width = "d_model" in settings and settings["d_model"].value.text == AUTO
    return auto_width, [r for r in _repeats(layers) if r.count.text == AUTO]


def _repeats(items: list[LayerItem] | tuple[LayerItem, ...]) -> list[Repeat]:
    """Every repeat group, outermost first."""
    found: list[Repeat] = []
    for item in items:
        if isinstance(item, Repeat):
            found += [item, *_repeats(item.body)]
    return found


# ---- solving ----------------------------------------------------------------------------------------

@dataclass
class Solution:
    """A sized model and its token count for one budget."""

    budget: float
    law: str
    tokens: int
    file: ArchFile
    arch: Arch
    graph: fx.GraphModule  # the sized model on the meta device, as analysed
    analysis: Analysis

    @property
    def train_flops(self) -> float:
        """Training compute actually spent: tokens x exact training FLOPs per token."""
        return self.tokens * self.analysis.flops_per_token_train

    @property
    def params_non_embedding(self) -> int:
        """Parameters outside the token embedding and an untied LM head."""
        return self.analysis.params_total - self.analysis.params_embedding

    @property
    def text(self) -> str:
        """The solved model as a concrete .arch file."""
        return format_file(self.file, ModelConfig.setting_names())

    def memory(self, devices: int = 1) -> TrainingMemory:
        """Training memory per device: AdamW in bf16 mixed precision, one sequence, FSDP over `devices`."""
        return training_memory(self.analysis, self.arch.config.vocab_size, processes=devices)

    def solved_settings(self) -> dict[str, int]:
        """The sizes the solver chose."""
        config = self.arch.config
        return {name: getattr(config, name) for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")}

    def to_json(self, devices: int = 1) -> dict[str, Any]:
        """The compile JSON schema plus the budget figures."""
        return {
            **self.analysis.to_json(),
            "budget": self.budget,
            "law": self.law,
            "tokens": self.tokens,
            "train_flops": self.train_flops,
            "compute_error": self.train_flops / self.budget - 1,
            "tokens_per_param": self.tokens / self.analysis.params_active,
            "params_non_embedding": self.params_non_embedding,
            "devices": devices,
            "train_memory_bytes": self.memory(devices).to_json(),
            "solved": self.solved_settings(),
        }


class _Figures:
    """Exact figures of one width as affine functions of the depth count.

    One analysis of the IR at depth 1; a layer's figures depend only on the layer and the settings, so the depth
    unit's share follows from the IR of depth 2 without analysing it.
    """

    def __init__(self, one: Arch, two: Arch) -> None:
        analysis = analyze(one, lower(one), one.config.seq_len)
        per_layer = dict(zip(one.layers, analysis.layers))

        def layers(arch: Arch) -> dict[str, float]:
            reports = [per_layer[layer] for layer in arch.layers]
            flops = 3 * sum(r.flops_per_token_fwd for r in reports)
            return {"params": sum(r.params_active for r in reports), "flops": flops, "non_embedding_flops": flops}

        first, second = layers(one), layers(two)
        total = {"params": analysis.params_active, "flops": analysis.flops_per_token_train, "non_embedding_flops": first["flops"]}
        self.unit = {k: second[k] - first[k] for k in total}
        self.base = {k: total[k] - self.unit[k] for k in total}

    def at(self, depth: int, metric: str) -> float:
        """A figure at this depth: params, flops (training, per token), non_embedding_flops, params_x_flops."""
        value = {k: self.base[k] + depth * self.unit[k] for k in self.base}
        if metric == "params_x_flops":
            return value["params"] * value["flops"]
        return value[metric]


_FIGURES: dict[tuple[Arch, Arch], _Figures] = {}  # by the IR at depths 1 and 2: sweeps reuse them


def figures(family: Family, width: Width) -> _Figures:
    """The (cached) figures of one width of a family."""
    key = (family.arch(width, 1), family.arch(width, 2))
    if key not in _FIGURES:
        _FIGURES[key] = _Figures(*key)
    return _FIGURES[key]


def nearest(f: Callable[[int], float], lo: int, hi: int, target: float, start: int) -> int:
    """The x in [lo, hi] whose f(x) is nearest `target` in ratio, for f increasing.

    Figures grow like a power of the size, so each step fits that power through the last two points
    (log f against log x) and jumps to where it meets the target: a few evaluations from `start`.
    """
    values: dict[int, float] = {}
    below, above = lo - 1, hi + 1  # nearest known x with f(x) < target, and with f(x) >= target
    x, previous = min(max(start, lo), hi), None
    while True:
        values[x] = f(x)
        if values[x] < target:
            below = max(below, x)
        else:
            above = min(above, x)
        if above - below <= 1:
            break
        power = 2.0  # a first step as if the figure grew with the square of the size
        if previous is not None and values[previous] != values[x]:
            power = math.log(values[x] / values[previous]) / math.log((x + 1) / (previous + 1))
        guess = round((x + 1) * (target / values[x]) ** (1 / power)) - 1 if power > 0 else (below + above) // 2
        previous, x = x, min(max(guess, below + 1), above - 1)
    if below < lo:
        return lo
    if above > hi:
        return hi
    return below if math.log(target / values[below]) < math.log(values[above] / target) else above


def solve(
    path_or_text: str | os.PathLike,
    budget: float,
    law: str | None = None,
    tokens: int | None = None,
    params: int | None = None,
    seq_len: int | None = None,
) -> Solution:
    """Size a file's model to a training-compute budget (FLOPs) under a law, or with tokens or params pinned."""
    if not (math.isfinite(budget) and budget > 0):
        raise ArchError(f"budget must be a positive number of FLOPs, got {budget:g}")
    if tokens is not None and params is not None:
        raise ArchError("--tokens and --params conflict: pin one side, the budget sets the other")
    if law is not None and (tokens is not None or params is not None):
        raise ArchError("--law conflicts with --tokens/--params: pinning one side replaces the law")
    for name, value in (("tokens", tokens), ("params", params)):
        if value is not None and value < 1:
            raise ArchError(f"--{name} must be positive, got {value:g}")
    arch_file = read(path_or_text)
    if seq_len is not None:
        arch_file.settings = [s for s in arch_file.settings if s.name != "seq_len"] + [Setting("seq_len", Value(str(seq_len), "number", None), None)]
    family = Family(arch_file)
    chosen = parse_law(law or "chinchilla")
    target = (
        Target("params", params) if params is not None
        else Target("flops", budget / tokens) if tokens is not None
        else chosen.target(budget)
    )
    if family.free_width:
        start = family.widths.index(family.reference_width) if family.reference_width in family.widths else 0

        def at_width(index: int) -> float:
            width = family.widths[index]
            return figures(family, width).at(family.depth_for(width), target.metric)

        index = nearest(at_width, 0, len(family.widths) - 1, target.value, start)
        width, depth = family.widths[index], family.depth_for(family.widths[index])
    else:
        width = family.widths[0]
        depth = nearest(lambda n: figures(family, width).at(n, target.metric), 1, family.deepest, target.value, family.reference_depth)
    arch = family.arch(width, depth)
    graph = lower(arch)
    analysis = analyze(arch, graph, arch.config.seq_len)
    per_token = analysis.flops_per_token_train
    one_sequence = per_token * arch.config.seq_len
    smallest = (family.widths[0], family.depth_for(family.widths[0]) if family.free_width else 1)
    if tokens is not None and tokens * per_token > budget * 1.01 and (width, depth) == smallest:
        raise ArchError(
            f"--tokens {tokens:.3g} needs {tokens * per_token:.3g} FLOPs even with the smallest model this file allows; "
            f"the budget is {budget:.3g}"
        )
    if budget < one_sequence:
        which = "the smallest model this file allows" if (width, depth) == smallest else "the sized model"
        raise ArchError(
            f"budget {budget:.3g} FLOPs is too small: {which} ({arch.config.d_model} wide, {len(arch.layers)} layers) "
            f"needs {one_sequence:.3g} FLOPs to train on one sequence of {arch.config.seq_len} tokens"
        )
    solved_tokens = tokens if tokens is not None else round(budget / per_token)
    name = "tokens" if tokens is not None else "params" if params is not None else chosen.name
    return Solution(budget, name, solved_tokens, family.file(width, depth), arch, graph, analysis)
