"""The training objective of a nanollm model as a module: next-token cross-entropy, fused into the model's graph by torch.compile."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class NextTokenLoss(torch.nn.Module):
    """The training objective as a module, so DDP wraps it and torch.compile fuses the loss into the model's graph.

    forward(rows) with rows (B, T + 1): the mean cross-entropy (fp32) of predicting rows[:, 1:] from
    rows[:, :-1], and the model's auxiliary loss (MoE balance and z-losses). `torch.compile(NextTokenLoss(model))`
    is the step `nanollm train --compile` takes: the logits never leave the compiled graph.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, aux_loss = self.model(rows[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten()), aux_loss
