"""nanollm: a declarative architecture compiler for LLM research."""
from __future__ import annotations

from typing import Any

from torch import fx

from .analysis import Analysis
from .compiled import Compiled, compile
from .errors import ArchError, NanollmError
from .ir import Arch, Call, Layer, ModelConfig
from .loss import NextTokenLoss

__all__ = ["Arch", "ArchError", "Analysis", "Call", "Compiled", "Layer", "ModelConfig", "NanollmError", "NextTokenLoss", "compile", "from_hf"]


def from_hf(model: Any) -> fx.GraphModule:
    """A nanollm model carrying the weights of a supported transformers causal LM (or a local directory of one)."""
    from . import hf  # transformers is imported only here

    return hf.from_hf(model)
