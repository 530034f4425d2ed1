"""How fast the attention mixers train on a CPU: each case times nanollm beside a reference, forward + backward.

Run: python bench/attention_patterns.py [--rounds R] [--threads K] [--only TEXT]. fp32, batch 1. CASES is a list of case
builders; a case is two train steps (nanollm's and its reference's), a sequence length and a target on the ratio.
The two steps of a case run in turns, so machine load falls on both alike; a case's ratio is the median over
rounds of the ratios measured within one round. Times are per token. The machine's fp32 matmul rate is printed
first, to place the absolute times.

- sinks: one GPT-OSS attention layer (sinks and projection biases; full, and sliding with a 128 window) beside
  transformers' GptOssAttention on its eager path (the only one it has on CPUs) with the same weights, 4 heads,
  1 KV head, head_dim 64, at T = 512, 2048 and 8192: target transformers / nanollm >= 1.0.
- blocksparse: the attention core over 8 heads (2 KV heads, head_dim 64) at T = 8192, blocks of 256 with 3 local and
  1 global (1/8 of the keys: 1024 of 8192 for the late queries) beside full causal SDPA of the same shape:
  target blocksparse / causal <= 0.35.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, GptOssRotaryEmbedding

import nanollm
from nanollm.compiler import initialize, make_component, make_table
from nanollm.components import complete
from nanollm.components.attention.blocksparse import Pattern, attend_gathered

Step = Callable[[], None]


@dataclass
class Case:
    """nanollm's train step and its reference's, and how their ratio is judged."""

    name: str
    length: int
    ours: Step
    reference: Step
    reference_name: str
    speedup: bool  # True: the target is reference / ours >= target; False: ours / reference <= target
    target: float


def train_step(forward: Callable[[], torch.Tensor], parameters: list[torch.Tensor]) -> Step:
    """Forward, then backward of the output dotted with a fixed probe, gradients cleared first."""
    probe: list[torch.Tensor] = []

    def run() -> None:
        for p in parameters:
            p.grad = None
        out = forward()
        if not probe:
            probe.append(torch.randn_like(out))
        (out * probe[0]).sum().backward()

    return run


def sinks_case(length: int, window: int | None) -> Case:
    """One GPT-OSS attention layer with sinks, nanollm's beside transformers' eager GptOssAttention."""
    d_model, heads, kv_heads, head_dim = 256, 4, 1, 64
    layer_type = "sliding_attention" if window else "full_attention"
    hf = GptOssConfig(hidden_size=d_model, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, num_hidden_layers=1,
                      layer_types=[layer_type], sliding_window=window or 128, attn_implementation="eager",
                      rope_parameters={"rope_type": "default", "rope_theta": 150000.0})
    theirs = GptOssAttention(hf, 0)
    config = nanollm.ModelConfig(d_model=d_model, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, qk_norm="none", rope_theta=150000.0)
    args = (("window", window),) if window else ()
    call = complete(nanollm.Call("sliding" if window else "global", (*args, ("bias", True), ("sinks", True))), "mixer", config)
    ours = make_component(call, config)
    initialize(ours)
    with torch.no_grad():
        for param in ours.parameters():
            param.normal_(0.0, 0.05)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, length, d_model, requires_grad=True)
    cos, sin = make_table(ours.rotary)(torch.arange(length))
    hf_rope = GptOssRotaryEmbedding(hf)(x, torch.arange(length)[None])
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    mask = torch.zeros(length, length).masked_fill(~((k <= q) & (q - k < (window or length))), float("-inf"))[None, None]
    with torch.no_grad():
        torch.testing.assert_close(ours(x, cos, sin), theirs(x, hf_rope, mask)[0], atol=1e-4, rtol=1e-4)  # the same layer
    return Case(f"sinks, {'sliding(128)' if window else 'global'}", length,
                train_step(lambda: ours(x, cos, sin), [x, *ours.parameters()]),
                train_step(lambda: theirs(x, hf_rope, mask)[0], [x, *theirs.parameters()]),
                "transformers GptOssAttention (eager)", speedup=True, target=1.0)


def blocksparse_case(length: int = 8192, block: int = 256, local: int = 3, leading: int = 1) -> Case:
    """The block-sparse core keeping 1/8 of the keys beside full causal attention of the same shape."""
    heads, kv_heads, head_dim = 8, 2, 64
    q = torch.randn(1, heads, length, head_dim, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, length, head_dim, requires_grad=True) for _ in range(2))
    pattern = Pattern(block, local, leading, 0)
    kept = block * (local + leading) / length
    return Case(f"blocksparse({block}, {local}, global={leading}): {kept:.3g} of the keys", length,
                train_step(lambda: attend_gathered(q, k, v, pattern, None, 0.0), [q, k, v]),
                train_step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), [q, k, v]),
                "full causal SDPA", speedup=False, target=0.35)


CASES: list[tuple[str, Callable[[], Case]]] = [  # (name, builder): built one at a time, so one case's tensors are alive at once
    *((f"sinks {'sliding' if window else 'global'} {length}", lambda length=length, window=window: sinks_case(length, window))
      for window in (None, 128) for length in (512, 2048, 8192)),
    ("blocksparse 8192", blocksparse_case),
]


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 matmul rate in GFLOP/s (best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--only", default="", help="run only the cases whose key contains this text (e.g. 'sinks global', '8192')")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    console = Console(width=170)
    console.print(f"fp32 matmul rate: {matmul_rate():.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    table = Table(title=f"attention, forward + backward, fp32, batch 1, {args.rounds} rounds", title_justify="left")
    for column in ("case", "T", "reference", "nanollm us/token", "reference us/token", "ratio", "target", "met"):
        table.add_column(column, justify="left" if column in ("case", "reference") else "right")
    for name, build in CASES:
        if args.only not in name:
            continue
        case = build()
        case.ours()  # warm-up: allocator, kernels, first-call paths
        case.reference()
        ours, reference = [], []
        for _ in range(args.rounds):
            ours.append(timed(case.ours))
            reference.append(timed(case.reference))
        ratio = statistics.median(r / o if case.speedup else o / r for o, r in zip(ours, reference))
        met = ratio >= case.target if case.speedup else ratio <= case.target
        per_token = lambda seconds: f"{statistics.median(seconds) / case.length * 1e6:.1f}"  # noqa: E731
        row = (case.name, str(case.length), case.reference_name, per_token(ours), per_token(reference),
               f"{ratio:.2f}" + (" faster" if case.speedup else " of the time"),
               (">= " if case.speedup else "<= ") + f"{case.target:g}", "yes" if met else "NO")
        console.print(" | ".join(row))  # as it comes: the long cases take minutes
        table.add_row(*row)
        del case
    console.print(table)


if __name__ == "__main__":
    main()
