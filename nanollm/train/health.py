"""Training health: steps with a non-finite loss or gradient are skipped (not applied) and counted, loss spikes are
reported, and gradient norms are taken per layer."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from ..components import distributed
from ..errors import RunError

SPIKE_WARMUP = 10  # steps of running statistics before a spike can be called
SPIKE_DECAY = 0.95  # weight of the past in the running mean and variance of the loss


class Health:
    """The run's count of skipped steps and loss spikes, and the running loss statistics spikes are judged by."""

    def __init__(self, max_bad_steps: int, spike_sigmas: float, state: dict[str, Any] | None = None) -> None:
        self.max_bad_steps, self.spike_sigmas = max_bad_steps, spike_sigmas
        saved = state or {}
        self.bad_steps: int = saved.get("bad_steps", 0)
        self.spikes: int = saved.get("spikes", 0)
        self.mean: float = saved.get("mean", 0.0)
        self.variance: float = saved.get("variance", 0.0)
        self.seen: int = saved.get("seen", 0)

    def state_dict(self) -> dict[str, Any]:
        return {"bad_steps": self.bad_steps, "spikes": self.spikes, "mean": self.mean, "variance": self.variance, "seen": self.seen}

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, float]:
        """Whether this step may be applied (loss and gradient finite in every process), and the mean loss over processes.

        One collective: every process skips the same steps.
        """
        norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        flags = torch.stack([(~finite).float(), torch.where(finite, loss.float(), torch.zeros_like(loss.float()))])
        if distributed():
            dist.all_reduce(flags)
            flags[1] /= dist.get_world_size()
        bad, mean_loss = flags.tolist()
        return bad == 0, mean_loss

    def skipped(self, step: int) -> str:
        """Count a skipped step; RunError once more than max_bad_steps have been skipped. Returns the line to report."""
        self.bad_steps += 1
        if self.bad_steps > self.max_bad_steps:
            raise RunError(f"step {step}: non-finite loss or gradient in {self.bad_steps} steps, more than max_bad_steps {self.max_bad_steps}: "
                           "the run stops (lower lr, raise warmup, or check the data); its last checkpoint is intact")
        return f"step {step}: non-finite loss or gradient; the update is skipped ({self.bad_steps} of at most {self.max_bad_steps})"

    def spike(self, step: int, loss: float) -> str | None:
        """Update the running statistics with an applied step's loss; a line to report if it is a spike."""
        line = None
        sd = math.sqrt(self.variance)
        if self.seen >= SPIKE_WARMUP and self.spike_sigmas and loss > self.mean + self.spike_sigmas * sd:
            self.spikes += 1
            line = f"step {step}: loss spike {loss:.4f}, {(loss - self.mean) / sd:.1f} standard deviations over the running mean {self.mean:.4f}"
        if self.seen == 0:
            self.mean = loss
        else:
            delta = loss - self.mean
            self.mean += (1 - SPIKE_DECAY) * delta
            self.variance = SPIKE_DECAY * (self.variance + (1 - SPIKE_DECAY) * delta * delta)
        self.seen += 1
        return line


def layer_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """The gradient norm of each layer (`grad_norm/layers.3`) and of each top-level module outside the layers (`grad_norm/embed`)."""
    squares: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(()))
    for name, parameter in model.named_parameters():
        if parameter.grad is None:
            continue
        parts = name.split(".")
        group = ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
        norm = torch.linalg.vector_norm(parameter.grad.float())
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        squares[group] = squares[group].to(norm.device) + norm * norm
    return {f"grad_norm/{group}": math.sqrt(value.item()) for group, value in squares.items()}
