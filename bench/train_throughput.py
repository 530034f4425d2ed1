"""Training-step throughput: nanollm's trainer step, its compiled model in a user's loop, and eager; transformers eager and compiled.

Run: python bench/train_throughput.py [--steps N] [--threads K]. One step is forward, cross-entropy (fp32, the same for every
variant), backward, AdamW step and zero_grad, for the same small Qwen3-shaped model (hidden 256, 4 layers, 4 heads
of 64, 2 KV heads, FFN 768, vocabulary 8192, untied head; batch 8 x 256 tokens) in fp32. Five variants:
- nanollm's trainer step: `torch.compile(nanollm.NextTokenLoss(model))`, the loss inside the compiled graph
  (what `nanollm train --compile` runs, and the public call for a user's own loop);
- nanollm's model compiled alone (`torch.compile(model)`) with the cross-entropy in the user's loop;
- nanollm eager (NextTokenLoss uncompiled);
- transformers' Qwen3ForCausalLM eager, and compiled with the loss inside the compiled module's forward, the
  anchor a researcher who cares about speed would pick.
The variants take turns step by step, so load from elsewhere on this shared machine falls on all of them alike;
each reports its median step. The machine's fp32 matmul rate (a 1024^3 matmul, measured in the same run) is
the ceiling for model-FLOPs utilisation, with the model's FLOPs from nanollm's analysis (training = 3 x
forward; attention counts only the (query, key) pairs a causal mask keeps).

Three more figures say what that utilisation means. Two bounds: every matrix multiply (and every attention
kernel) of one nanollm training step, recorded at dispatch and replayed alone on its own arguments; a step
that spent no time outside those kernels would reach that utilisation and no more. And utilisation by 6N:
6 x all parameters per token, embedding lookup included, a rough count that overstates this model's work.
Targets (issue #20): the trainer step >= 1.2x compiled transformers and >= 95% of the replayed-kernel bound;
eager nanollm >= 1.0x eager transformers; the compiled model with the loss in the user's loop >= 1.0x
compiled transformers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode

import nanollm

ARCH = """
vocab_size = 8192
d_model = 256
n_heads = 4
n_kv_heads = 2
head_dim = 64
d_ff = 768
tie_embeddings = false
seq_len = 256
repeat 4 < global >
"""
BATCH, LENGTH = 8, 256


def matmul_rate(size: int = 1024, repeats: int = 20) -> float:
    """Median fp32 FLOP/s of a size^3 matmul."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


class Kernels(TorchDispatchMode):
    """Records every matrix multiply and attention kernel dispatched while active, with copies of its arguments."""

    GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    def __init__(self) -> None:
        super().__init__()
        self.gemms: list[tuple] = []
        self.attention: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        calls = self.gemms if func in self.GEMMS else self.attention if "scaled_dot_product" in func.name() else None
        if calls is not None:
            copy = lambda value: value.detach().clone() if isinstance(value, torch.Tensor) else value
            calls.append((func, [copy(value) for value in args], {key: copy(value) for key, value in kwargs.items()}))
        return func(*args, **kwargs)


def replay_seconds(calls: list[tuple], repeats: int) -> float:
    """Time of the recorded kernels run again one by one on their own arguments (median of repeats each), summed."""
    total = 0.0
    for func, args, kwargs in calls:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            func(*args, **kwargs)
            times.append(time.perf_counter() - start)
        total += statistics.median(times)
    return total


def hf_model() -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, attn_implementation="sdpa")
    return Qwen3ForCausalLM(config)


class HFNextTokenLoss(torch.nn.Module):
    """transformers' model with the same objective as nanollm's trainer, the loss inside the module's forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=rows[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten()), torch.zeros(())


def loss_in_the_loop(model: torch.nn.Module):
    """The objective written in a user's own loop around a (compiled) nanollm model: the loss outside the model's graph."""

    def loss(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, aux_loss = model(rows[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten()), aux_loss

    return loss


def step_fn(parameters: list[torch.nn.Parameter], loss_fn) -> callable:
    """One training step on a fixed batch: the objective, backward, AdamW."""
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, fused=True)
    rows = torch.randint(0, 8192, (BATCH, LENGTH + 1))

    def step() -> None:
        loss, aux_loss = loss_fn(rows)
        (loss + aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


TRAINER, USER, EAGER, HF_EAGER, HF_COMPILED = (
    "nanollm trainer step: compile(NextTokenLoss(model))",
    "nanollm compile(model), loss in the loop",
    "nanollm eager",
    "transformers Qwen3 eager",
    "transformers Qwen3 compiled, loss inside",
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after warm-up)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    compiled = nanollm.compile(ARCH)
    flops_per_token = compiled.analyze(LENGTH).flops_per_token_train
    eager, fused, users, reference, reference_fused = compiled.build(), compiled.build(), compiled.build(), hf_model(), hf_model()
    variants = {
        TRAINER: step_fn(list(fused.parameters()), torch.compile(nanollm.NextTokenLoss(fused))),
        USER: step_fn(list(users.parameters()), loss_in_the_loop(torch.compile(users))),
        EAGER: step_fn(list(eager.parameters()), nanollm.NextTokenLoss(eager)),
        HF_EAGER: step_fn(list(reference.parameters()), HFNextTokenLoss(reference)),
        HF_COMPILED: step_fn(list(reference_fused.parameters()), torch.compile(HFNextTokenLoss(reference_fused))),
    }
    start = time.perf_counter()
    for step in variants.values():  # warm-up; the compiled variants compile here
        step()
        step()
    warmup = time.perf_counter() - start
    with Kernels() as kernels:
        variants[EAGER]()
    bounds = {"its GEMMs alone": kernels.gemms, "its GEMMs and attention alone": kernels.gemms + kernels.attention}
    times: dict[str, list[float]] = {name: [] for name in [*variants, *bounds]}
    rates = [matmul_rate()]
    for _ in range(args.steps):
        for name, step in variants.items():
            begin = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - begin)
        for name, calls in bounds.items():
            times[name].append(replay_seconds(calls, repeats=3))
        rates.append(matmul_rate(repeats=5))
    ceiling = statistics.median(rates)

    tokens = BATCH * LENGTH
    six_n = 6 * sum(p.numel() for p in eager.parameters())
    speed = {name: tokens / statistics.median(t) for name, t in times.items()}
    anchor = speed[HF_COMPILED]
    table = Table(title=f"training step, batch {BATCH} x {LENGTH}, fp32, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f} "
                        f"({flops_per_token / 1e6:.1f} MFLOP/token, 6N = {six_n / 1e6:.1f} MFLOP/token; "
                        f"warm-up incl. compiles {warmup:.0f} s)", title_justify="left")
    for column in ("variant", "median step (s)", "tokens/s", "vs transformers compiled", "vs transformers eager", "model FLOP/s",
                   "of fp32 matmul rate", "by 6N"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, rate in speed.items():
        table.add_row(name, f"{tokens / rate:.3f}", f"{rate:,.0f}", f"{rate / anchor:.3f}x", f"{rate / speed[HF_EAGER]:.3f}x",
                      f"{rate * flops_per_token / 1e9:.1f} G", f"{rate * flops_per_token / ceiling:.1%}", f"{rate * six_n / ceiling:.1%}")
    table.add_row("fp32 matmul 1024^3", "", "", "", "", f"{ceiling / 1e9:.1f} G", "100%", "")
    console = Console(width=160)
    console.print(table)
    bound = speed["its GEMMs and attention alone"]
    console.print(f"trainer step / transformers compiled = {speed[TRAINER] / anchor:.3f} (target >= 1.2)\n"
                  f"trainer step / replayed-kernel bound (GEMMs and attention) = {speed[TRAINER] / bound:.1%} (target >= 95%)\n"
                  f"eager / transformers eager = {speed[EAGER] / speed[HF_EAGER]:.3f} (target >= 1.0)\n"
                  f"compile(model) + loss in the loop / transformers compiled = {speed[USER] / anchor:.3f} (target >= 1.0)\n"
                  f"trainer step / compile(model) + loss in the loop = {speed[TRAINER] / speed[USER]:.3f} (the fused loss's gain)\n"
                  f"transformers compiled / eager = {anchor / speed[HF_EAGER]:.3f}\n"
                  f"trainer step model FLOP/s = {speed[TRAINER] * flops_per_token / ceiling:.1%} of the matmul rate, where the step's own "
                  f"kernels, run alone, bound it at {speed['its GEMMs alone'] * flops_per_token / ceiling:.1%} (GEMMs) and "
                  f"{bound * flops_per_token / ceiling:.1%} (GEMMs and attention); by 6N: trainer step {speed[TRAINER] * six_n / ceiling:.1%}, "
                  f"transformers compiled {anchor * six_n / ceiling:.1%}")


if __name__ == "__main__":
    main()
