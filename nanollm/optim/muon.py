"""Muon (Jordan et al. 2024): momentum, then Newton-Schulz orthogonalisation of each matrix's update.

The algorithm and hyperparameters are torch.optim.Muon's, with three differences that training needs:
- The Newton-Schulz iteration runs in a chosen dtype: bf16 on GPUs (torch's choice, bit-for-bit its update)
  and fp32 on CPUs, whose bf16 matmuls are ~90x slower than fp32 on AVX2.
- Stacks of matrices (MoE experts, shaped (experts, out, in) like nn.Linear weights) are orthogonalised
  matrix by matrix.
- FSDP2-sharded parameters (DTensors) are orthogonalised whole: the update is gathered, orthogonalised,
  and each process keeps its shard.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (and Keller Jordan's) quintic
ADJUST_LR = ("original", "match_rms_adamw")


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 where it is fast (GPUs), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def orthogonalize(update: Tensor, steps: int, eps: float, dtype: torch.dtype) -> Tensor:
    """Newton-Schulz zeroth power of each matrix in the last two dims (torch.optim.Muon's iteration)."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    wide = x.size(-2) > x.size(-1)
    if wide:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    addmm = torch.addmm if x.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        x = addmm(x, addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if wide else x


def matrix_shape(param: Tensor) -> tuple[int, int]:
    """(fan_out, fan_in) of one matrix of a weight or a stack of them, laid out (out, in) like nn.Linear's."""
    return param.shape[-2], param.shape[-1]


def adjusted_lr(lr: float, adjust: str, shape: tuple[int, int]) -> float:
    """torch.optim.Muon's per-matrix learning-rate scale."""
    rows, cols = shape
    if adjust == "original":
        return lr * math.sqrt(max(1, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols))


class Muon(torch.optim.Optimizer):
    """Muon for matrices (2-D, or stacks of them); every other parameter belongs in another optimiser."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str = "original",
        ns_dtype: torch.dtype | None = None,
    ) -> None:
        if adjust_lr_fn not in ADJUST_LR:
            raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR}, got {adjust_lr_fn!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, eps=eps,
                        ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon takes matrices; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of every parameter that has a gradient."""
        # Imported here, not with the module: DTensor would cost half a second of every command line's start.
        from torch.distributed.tensor import DTensor, distribute_tensor

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                dtype = group["ns_dtype"] or default_ns_dtype(p.device)
                if isinstance(update, DTensor):
                    full = orthogonalize(update.full_tensor(), group["ns_steps"], group["eps"], dtype)
                    update = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
                else:
                    update = orthogonalize(update, group["ns_steps"], group["eps"], dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], matrix_shape(p)))
        return loss
