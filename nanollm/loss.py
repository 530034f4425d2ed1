"""The training objective of a nanollm model as a module: next-token cross-entropy, fused into the model's graph by torch.compile."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, V) against targets (N,) for eager runs: F.cross_entropy's value bit for bit, its
    gradient to rounding (exp of the log-probabilities by another kernel).

    The gradient, softmax - one-hot, is written over the log-probabilities the forward saved: eager PyTorch's own
    backward allocates and zero-fills one logits-sized tensor and writes another (on the bench's CPU model that
    halves the loss's time). The saved tensor is spent, so a second backward through the same graph raises.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probabilities = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(log_probabilities, targets)
        return F.nll_loss(log_probabilities, targets)  # F.cross_entropy's own reduction: the same value, bit for bit

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        log_probabilities, targets = ctx.saved_tensors
        gradient = log_probabilities.exp_()
        gradient[torch.arange(len(targets), device=targets.device), targets] -= 1
        return gradient.mul_(grad / len(targets)), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (N, V) against targets (N,): F.cross_entropy under torch.compile (inductor fuses its
    own), `CrossEntropy` in eager runs."""
    if torch.compiler.is_compiling():
        return F.cross_entropy(logits, targets)
    return CrossEntropy.apply(logits, targets)


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
        return cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten()), aux_loss
