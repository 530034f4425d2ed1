"""Training-step throughput: nanollm's trainer step, its compiled model in a user's loop, and eager; transformers eager and compiled.

Run: python bench/train_throughput.py [--steps N] [--threads K] [--against CHECKOUT]. One step is forward, cross-entropy
(fp32, the same value for every variant), backward, AdamW step and zero_grad, for the same small Qwen3-shaped model (hidden 256, 4 layers, 4 heads
of 64, 2 KV heads, FFN 768, vocabulary 8192, untied head; batch 8 x 256 tokens) in fp32. Five variants:
- nanollm's trainer step: `torch.compile(nanollm.NextTokenLoss(model))`, the loss inside the compiled graph
  (what `nanollm train --compile` runs, and the public call for a user's own loop);
- nanollm's model compiled alone (`torch.compile(model)`) with the cross-entropy in the user's loop;
- nanollm eager (NextTokenLoss uncompiled, its cross-entropy's gradient written over the saved log-probabilities);
- transformers' Qwen3ForCausalLM eager, and compiled with the loss inside the compiled module's forward, the
  anchor a researcher who cares about speed would pick.
The variants take turns step by step, each round starting one later, so load from elsewhere on this shared machine
falls on all of them alike; each reports its median step. The machine's fp32 matmul rate (a 1024^3 matmul,
measured in the same run) is the ceiling for model-FLOPs utilisation, with the model's FLOPs from nanollm's
analysis (training = 3 x forward; attention counts only the (query, key) pairs a causal mask keeps).

Three more figures say what that utilisation means. Two bounds: every matrix multiply (and every attention
kernel) of one nanollm training step, recorded at dispatch and replayed alone on its own arguments; a step
that spent no time outside those kernels would reach that utilisation and no more. And utilisation by 6N:
6 x all parameters per token, embedding lookup included, a rough count that overstates this model's work.

What a step must do besides those kernels, with the same kernels, is timed alone in the same turns: the same fused
AdamW over copies of the parameters holding one step's gradients, and a copy of a logits-sized tensor, the least
memory traffic of the loss (the LM head's GEMM writes the logits; the loss must read them and write their gradient
for the backward GEMMs). From those, in the same run: the most a step doing only the replayed kernels (and only the
kernels plus that floor) could gain on compiled transformers, against the 1.2x target, and the share of the
replayed-kernel bound the floor leaves reachable, against the 95% target. `--against CHECKOUT` (`git worktree add
../old REV`) also times that checkout's trainer step and eager step in the same turns, its nanollm imported beside
this one.
Targets (issue #20): the trainer step >= 1.2x compiled transformers and >= 95% of the replayed-kernel bound;
eager nanollm >= 1.0x eager transformers; the compiled model with the loss in the user's loop >= 1.0x
compiled transformers.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
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


GEMMS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


class Kernels(TorchDispatchMode):
    """Records every matrix multiply and attention kernel dispatched while active, with copies of its arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.gemms: list[tuple] = []
        self.attention: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        calls = self.gemms if func in GEMMS else self.attention if "scaled_dot_product" in func.name() else None
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


def optimizer_alone(model: torch.nn.Module, loss_fn) -> callable:
    """The step's AdamW alone: the same fused AdamW over copies of the model's parameters holding the gradients of one step."""
    loss, aux_loss = loss_fn(torch.randint(0, 8192, (BATCH, LENGTH + 1)))
    (loss + aux_loss).backward()
    parameters = []
    for parameter in model.parameters():
        parameters.append(parameter.detach().clone().requires_grad_())
        parameters[-1].grad, parameter.grad = parameter.grad, None
    return torch.optim.AdamW(parameters, lr=1e-3, fused=True).step


def logits_copy() -> callable:
    """A copy of a tensor the size of the logits: the least memory traffic of any exact loss, which must read the logits
    once and write their gradient once (fp32)."""
    logits, gradient = torch.randn(BATCH * LENGTH, 8192), torch.empty(BATCH * LENGTH, 8192)
    return lambda: gradient.copy_(logits)


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
GEMM_BOUND, KERNEL_BOUND = "its GEMMs alone", "its GEMMs and attention alone"
ADAMW, LOGITS = "its fused AdamW alone", "a copy of the logits (the loss's least traffic)"


def checkout_package(directory: str):
    """The nanollm package of another checkout (`git worktree add ../old REV`), imported beside this one as nanollm_against."""
    spec = importlib.util.spec_from_file_location("nanollm_against", os.path.join(directory, "nanollm", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(directory, "nanollm")])
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    return package


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after warm-up)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    parser.add_argument("--against", metavar="CHECKOUT", help="also time another checkout's trainer step and eager step, in turns")
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
    if args.against:
        other = checkout_package(args.against)
        other_compiled = other.compile(ARCH)
        other_fused, other_eager = other_compiled.build(), other_compiled.build()
        variants[f"{TRAINER} ({args.against})"] = step_fn(list(other_fused.parameters()), torch.compile(other.NextTokenLoss(other_fused)))
        variants[f"{EAGER} ({args.against})"] = step_fn(list(other_eager.parameters()), other.NextTokenLoss(other_eager))
    start = time.perf_counter()
    for step in variants.values():  # warm-up; the compiled variants compile here
        step()
        step()
    warmup = time.perf_counter() - start
    with Kernels() as kernels:
        variants[EAGER]()
    bounds = {GEMM_BOUND: kernels.gemms, KERNEL_BOUND: kernels.gemms + kernels.attention}
    # What any exact step must also do besides those kernels, timed in the same turns: the optimiser, and the loss's traffic.
    floors = {ADAMW: optimizer_alone(eager, nanollm.NextTokenLoss(eager)), LOGITS: logits_copy()}
    for floor in floors.values():
        floor()  # AdamW creates its state on the first step
    times: dict[str, list[float]] = {name: [] for name in [*variants, *bounds, *floors]}
    rates = [matmul_rate()]
    turns = [*variants.items(), *floors.items()]
    for round_index in range(args.steps):
        shift = round_index % len(turns)  # each round starts one variant later: no variant always follows the same one
        for name, step in turns[shift:] + turns[:shift]:
            begin = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - begin)
        for name, calls in bounds.items():
            times[name].append(replay_seconds(calls, repeats=3))
        rates.append(matmul_rate(repeats=5))
    ceiling = statistics.median(rates)

    tokens = BATCH * LENGTH
    six_n = 6 * sum(p.numel() for p in eager.parameters())
    seconds = {name: statistics.median(t) for name, t in times.items()}
    speed = {name: tokens / seconds[name] for name in [*variants, *bounds]}
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
    bound = speed[KERNEL_BOUND]
    floor = seconds[KERNEL_BOUND] + seconds[ADAMW] + seconds[LOGITS]
    lines = [f"trainer step / transformers compiled = {speed[TRAINER] / anchor:.3f} (target >= 1.2)",
             f"trainer step / replayed-kernel bound (GEMMs and attention) = {speed[TRAINER] / bound:.1%} (target >= 95%)",
             f"eager / transformers eager = {speed[EAGER] / speed[HF_EAGER]:.3f} (target >= 1.0)",
             f"compile(model) + loss in the loop / transformers compiled = {speed[USER] / anchor:.3f} (target >= 1.0)",
             f"trainer step / compile(model) + loss in the loop = {speed[TRAINER] / speed[USER]:.3f} (the fused loss's gain)",
             f"transformers compiled / eager = {anchor / speed[HF_EAGER]:.3f}"]
    if args.against:
        lines += [(f"against {args.against}: trainer step {speed[TRAINER] / speed[f'{TRAINER} ({args.against})']:.3f}x, "
                  f"eager {speed[EAGER] / speed[f'{EAGER} ({args.against})']:.3f}x")]
    lines += [(f"trainer step model FLOP/s = {speed[TRAINER] * flops_per_token / ceiling:.1%} of the matmul rate, where the step's own "
              f"kernels, run alone, bound it at {speed[GEMM_BOUND] * flops_per_token / ceiling:.1%} (GEMMs) and "
              f"{bound * flops_per_token / ceiling:.1%} (GEMMs and attention); by 6N: trainer step {speed[TRAINER] * six_n / ceiling:.1%}, "
              f"transformers compiled {anchor * six_n / ceiling:.1%}"),
              (f"what any exact step must also do, timed alone in the same turns: {ADAMW} {seconds[ADAMW] * 1e3:.1f} ms, "
              f"{LOGITS} {seconds[LOGITS] * 1e3:.1f} ms; with the GEMMs and attention ({seconds[KERNEL_BOUND] * 1e3:.1f} ms) "
              f"a floor of {floor * 1e3:.1f} ms a step"),
              (f"ceilings: a step doing nothing but its GEMMs and attention would be {seconds[HF_COMPILED] / seconds[KERNEL_BOUND]:.3f}x "
              f"transformers compiled, one doing only the floor's work {seconds[HF_COMPILED] / floor:.3f}x (target 1.2x); the floor "
              f"leaves {seconds[KERNEL_BOUND] / floor:.1%} of the replayed-kernel bound reachable (target 95%)")]
    console.print("\n".join(lines))


if __name__ == "__main__":
    main()
