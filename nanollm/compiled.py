"""A compiled architecture: the IR, its meta-device GraphModule, and the analyses of that graph."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import fx

from .analysis import Analysis, InferenceView, analyze, inference_view, stored_analysis
from .compiler import lower, materialize
from .ir import Arch, ModelConfig
from .resolve import load


class Compiled:
    """A compiled architecture: its IR, its meta-device GraphModule, and the analysis of that graph."""

    def __init__(self, arch: Arch, stored: bool = False) -> None:
        self.arch = arch
        self.stored = stored  # analyses kept in nanollm's cache folder between processes (the command line's start-up)
        self.graph: fx.GraphModule = lower(arch)
        self._analyses: dict[int, Analysis] = {}

    @property
    def config(self) -> ModelConfig:
        """The model settings."""
        return self.arch.config

    @property
    def analysis(self) -> Analysis:
        """Analysis at the model's own seq_len."""
        return self.analyze(self.config.seq_len)

    def analyze(self, seq_len: int) -> Analysis:
        """Analysis at a given sequence length (cached)."""
        if seq_len not in self._analyses:
            self._analyses[seq_len] = (stored_analysis if self.stored else analyze)(self.arch, self.graph, seq_len)
        return self._analyses[seq_len]

    def inference(self, context: int) -> InferenceView:
        """Prefill FLOPs, decode FLOPs per token and cache bytes of one sequence at a context of `context` tokens."""
        return inference_view(self.arch, self.graph, self.analyze(context), self.analyze(context + 1))

    def build(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> fx.GraphModule:
        """The same graph with real initialised weights; forward(input_ids) -> (logits, aux_loss)."""
        return materialize(self.graph, device, dtype)


def compile(path_or_text: str | os.PathLike | Arch, **overrides: Any) -> Compiled:  # noqa: A001 - the API's name
    """Compile an .arch file path, .arch source text, or an Arch; keyword overrides replace settings."""
    arch = path_or_text if isinstance(path_or_text, Arch) else load(path_or_text, **overrides)
    return Compiled(arch)
