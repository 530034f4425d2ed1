"""State-space and convolution mixers: Mamba-2 (SSD) and LFM2's gated short convolution."""
from __future__ import annotations

import torch

from ..linear import scalar_decay

# The training forwards run long sequences in segments of this much of in_proj's output, the convolution's inputs (and
# Mamba-2's state) carried: (T, width) tensors above glibc's 32 MiB mmap threshold are mapped afresh at every
# allocation, every page faulted in and zeroed, which made the same work per token ~1.3x dearer at 8192 tokens than at 2048.
LAYER_SEGMENT_BYTES = 24 << 20


def segment_length(x: torch.Tensor, width: int, multiple: int = 1) -> int:
    """Tokens per segment of x (B, T, .) for an in_proj of `width` outputs: a multiple of `multiple`, at least one."""
    return scalar_decay.tokens_within(LAYER_SEGMENT_BYTES, x.shape[0] * width * x.element_size(), multiple)
