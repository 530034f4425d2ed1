"""Training memory of one process: the one model `compile --budget` reports and the trainer checks before it builds."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .analysis import Analysis


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes one process holds while training, by what holds them."""

    weights: float  # fp32 master weights (a share of them under FSDP)
    gradients: float  # fp32 gradients (likewise)
    optimizer: float  # AdamW's two fp32 moments, or Muon's one on its matrices
    activations: float  # one micro-batch's saved activations, as the analysis counts them
    logits: float  # one micro-batch's fp32 logits and their gradient
    fsdp_gathered: float  # FSDP: one layer's full weights gathered and the next one prefetched

    @property
    def state(self) -> float:
        """Weights, gradients and optimiser state."""
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.state + self.activations + self.logits + self.fsdp_gathered

    def to_json(self) -> dict[str, float]:
        """Plain data, with the state and the total."""
        return {**asdict(self), "state": self.state, "total": self.total}


def training_memory(analysis: Analysis, vocab_size: int, *, muon_params: int = 0, processes: int = 1, sharded: bool = True,
                    bf16: bool = True, micro_batch: int = 1) -> TrainingMemory:
    """Memory per process for training the analysed model at its sequence length.

    `muon_params` of the parameters get Muon (one moment) instead of AdamW (two); `sharded` (FSDP) divides the
    state over the processes and adds two gathered layers, in bf16 or fp32 as the run computes; otherwise
    (DDP) every process holds all of it.
    """
    share = processes if sharded else 1
    params = analysis.params_total
    width = 2 if bf16 else 4  # bytes of an activation; the analysis counts bf16 ones
    gathered = 2 * width * max((layer.params for layer in analysis.layers), default=0) if sharded and processes > 1 else 0
    return TrainingMemory(
        weights=4 * params / share,
        gradients=4 * params / share,
        optimizer=(8 * (params - muon_params) + 4 * muon_params) / share,
        activations=analysis.activation_bytes * micro_batch * width / 2,
        logits=2 * 4 * micro_batch * analysis.seq_len * vocab_size,
        fsdp_gathered=gathered,
    )
