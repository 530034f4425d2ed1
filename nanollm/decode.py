"""Incremental decoding: prefill a prompt, then one token at a time, each sublayer continuing from its own state.

The decode contract (what a component implements to generate): `Component.state(batch, capacity, device, dtype)`
declares its inference state, a dict of tensors (None for a component whose output at a position depends on that
position alone: an FFN or an MoE decodes by its forward); `Component.decode(state, start, *inputs)` is its forward
for the T >= 1 new tokens at positions start..start+T-1, seeing the earlier ones only through the state, which it
updates in place. `global` keeps every key and value; `sliding` a ring buffer of its last `window`.

Decoding is a second lowering of the same IR, not the training graph with extra inputs. The training graph's
contract stays forward(input_ids) -> (logits, aux_loss) with positions 0..T-1 built inside, which the trainer,
FSDP, torch.compile and the analysis rely on; a cache threaded through it would be an input every caller must
pass and every component must accept in its forward. Both graphs are emitted by the same `compiler.wire` and
call the same modules (so the same weights), and differ in three places only: the positions start at an offset
(`start`, a graph input), each stateful sublayer is a call of its component's `decode` with its state (the
`states` input, a dict keyed by module path, as fla's past_key_values is keyed by layer), and the graph returns
the logits alone. A component, residual scheme or position encoding added to the language therefore decodes
with no change here. The decoding graph runs on the meta device too: with meta states it gives the shapes of a
step at any context.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import fx

from .compiler import Lowering, Site, wire
from .components import Component
from .errors import NanollmError
from .ir import Arch

States = dict[str, dict[str, torch.Tensor]]


def offset_positions(input_ids: torch.Tensor, start: int) -> torch.Tensor:
    """Positions start..start+T-1 of T new tokens."""
    return torch.arange(start, start + input_ids.shape[-1], device=input_ids.device)


def stateful_sublayers(model: fx.GraphModule, arch: Arch) -> dict[str, Component]:
    """The components that declare an inference state, by module path."""
    found = {}
    for i, layer in enumerate(arch.layers):
        for slot, _ in layer.sublayers:
            path = Site(i, slot).module()
            component = model.get_submodule(path)
            if component.state(1, 1, "meta", torch.float32) is not None:
                found[path] = component
    return found


def lower_decoding(arch: Arch, model: fx.GraphModule) -> fx.GraphModule:
    """The decoding graph of a model built from `arch`, sharing its modules: forward(input_ids, start, states) -> logits."""
    g = Lowering()
    input_ids = g.graph.placeholder("input_ids")
    start = g.graph.placeholder("start")
    states = g.graph.placeholder("states")
    positions = g.function(offset_positions, (input_ids, start), "positions")
    stateful = stateful_sublayers(model, arch)

    def call_sublayer(site: Site, args: tuple) -> fx.Node:
        if site.module() not in stateful:
            return g.call(site, None, args)
        component = g.graph.create_node("get_attr", site.module(), (), name=f"{site.node()}_module")
        state = g.function(operator.getitem, (states, site.module()), site.node("state"))
        return g.graph.create_node("call_method", "decode", (component, state, start, *args), name=site.node())

    logits, _ = wire(g, model, arch, input_ids, positions, call_sublayer)
    g.graph.output(logits)
    return fx.GraphModule(model, g.graph, class_name="NanoLLMDecoder")


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: greedy at temperature 0, else softmax(logits / temperature) within top-k and top-p."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The next token of each row of (B, V) logits."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            before = ordered.softmax(dim=-1).cumsum(dim=-1) - ordered.softmax(dim=-1)  # mass of the tokens ranked higher
            ordered = ordered.masked_fill(before >= self.top_p, float("-inf"))  # the top token always stays
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


class Decoder:
    """A model's decoding graph and the states it continues from; `generate` streams tokens."""

    def __init__(self, model: fx.GraphModule, arch: Arch, context: int, compiled: bool = False) -> None:
        self.model, self.arch, self.context = model, arch, context
        self.graph = lower_decoding(arch, model)
        if compiled:  # one graph for prefills and one for single tokens, lengths and positions symbolic: no recompiling per step
            self.graph = torch.compile(self.graph, dynamic=True)
        self.stateful = stateful_sublayers(model, arch)

    def states(self, batch: int, capacity: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> States:
        """Empty states for `batch` sequences of up to `capacity` tokens, on the model's device and in its dtype."""
        weight = self.model.embed.weight
        return {path: component.state(batch, capacity, device or weight.device, dtype or weight.dtype)
                for path, component in self.stateful.items()}

    def step(self, input_ids: torch.Tensor, start: int, states: States) -> torch.Tensor:
        """Logits (B, T, V) of T new tokens at positions start.., the states updated."""
        return self.graph(input_ids, start, states)

    def check(self, prompt: torch.Tensor) -> None:
        """NanollmError if a (B, T) prompt is empty or longer than the model's context."""
        if not 0 < prompt.shape[1] <= self.context:
            raise NanollmError(f"the prompt has {prompt.shape[1]} tokens; the model takes 1 to {self.context} (its context)")

    @torch.inference_mode()  # lighter than no_grad per op: nothing generated is ever differentiated
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(), seed: int | None = None,
                 eos: int | None = None) -> Iterator[torch.Tensor]:
        """Prefill (B, T) prompt ids, then yield each new token (B,) as it is drawn, up to `max_new_tokens` or the
        model's context; stops early once every row has produced `eos`."""
        self.check(prompt)
        length = prompt.shape[1]
        total = min(length + max_new_tokens, self.context)
        generator = None if seed is None else torch.Generator(prompt.device).manual_seed(seed)
        states = self.states(prompt.shape[0], total)
        logits = self.step(prompt, 0, states)[:, -1]
        finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        for position in range(length, total):
            token = sampling.choose(logits, generator)
            yield token
            if eos is not None:
                finished |= token == eos
                if bool(finished.all()):
                    return
            if position + 1 < total:
                logits = self.step(token[:, None], position, states)[:, -1]


def generated(decoder: Decoder, prompt: torch.Tensor, max_new_tokens: int, **options: Any) -> torch.Tensor:
    """All new tokens (B, N) of `Decoder.generate` at once."""
    return torch.stack(list(decoder.generate(prompt, max_new_tokens, **options)), dim=1)


def stream_text(decoder: Decoder, tokenizer: Any, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(),
                seed: int | None = None) -> Iterator[str]:
    """The text of one prompt's (1, T) continuation, piece by piece as tokens arrive (until the tokenizer's EOS)."""
    tokens: list[int] = []
    shown = ""
    for token in decoder.generate(prompt, max_new_tokens, sampling, seed, eos=tokenizer.eos_token_id):
        if int(token[0]) == tokenizer.eos_token_id:
            return
        tokens.append(int(token[0]))
        text = tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):  # a character whose bytes are still arriving is shown when complete
            yield text[len(shown):]
            shown = text


def sample(model: fx.GraphModule, arch: Arch, tokenizer: Any, context: int, max_new_tokens: int = 32) -> str:
    """A greedy continuation of the start of a document (the tokenizer's EOS, which separates packed documents)."""
    prompt = torch.tensor([[tokenizer.eos_token_id]], device=model.embed.weight.device)
    return "".join(stream_text(Decoder(model, arch, context), tokenizer, prompt, max_new_tokens))
