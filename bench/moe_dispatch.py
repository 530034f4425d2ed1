"""How fast one MoE layer trains: nanollm's dispatch against transformers' per-expert loop and the dense floor.

Run: python bench/moe_dispatch.py [--tokens N] [--d-model D] [--d-expert F] [--rounds R] [--threads K]. One layer of 64
experts, top-8 (OLMoE's routing) at OLMoE's width ratio scaled down (d_model 512, experts 256 wide), over
8192 tokens in fp32 on the CPU; each way times forward + backward, input gradient included (the layer sits
inside a model):

- nanollm: `moe` as it runs on a CPU (router, tokens sorted by expert, then per expert: its rows, its SwiGLU
  weighted on the hidden rows, added back), also what runs under torch.compile in fp32;
- nanollm grouped_mm: the same layer forced onto its GPU path, two torch._grouped_mm over all sorted rows;
- transformers eager: Qwen3MoeSparseMoeBlock with experts_implementation="eager" (a loop over the experts hit,
  each gathering its tokens by index), the per-expert loop of the issue;
- transformers grouped_mm: the same block with its grouped_mm experts;
- floor: one dense SwiGLU of width k x d_expert over the same tokens: the same active FLOPs with no routing.

The ways run round-robin, so machine load (other users, frequency changes) hits them alike; the ratios are
medians over rounds of ratios measured within one round. Targets: nanollm within 1.3x of the floor and at
least 1.2x faster than transformers' eager loop.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import nanollm
from nanollm.compiler import initialize, make_component
from nanollm.components.ffn import dispatch
from nanollm.hf import moe_call

EXPERTS, TOP = 64, 8


def train_step(module: torch.nn.Module, x: torch.Tensor, probe: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of one layer (its output dotted with a fixed probe), gradients cleared first."""

    def run() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        (out * probe).sum().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-expert", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def hf_config(implementation: str) -> Qwen3MoeConfig:
        return Qwen3MoeConfig(
            hidden_size=args.d_model, moe_intermediate_size=args.d_expert, num_experts=EXPERTS, num_experts_per_tok=TOP,
            norm_topk_prob=True, experts_implementation=implementation,
        )

    def hf_block(implementation: str) -> Qwen3MoeSparseMoeBlock:
        torch.manual_seed(0)
        block = Qwen3MoeSparseMoeBlock(hf_config(implementation))
        for param in block.parameters():
            torch.nn.init.normal_(param, std=0.05)
        return block

    eager, grouped = hf_block("eager"), hf_block("grouped_mm")
    config = nanollm.ModelConfig(d_model=args.d_model)
    call = moe_call(hf_config("eager"), config)
    ours = make_component(call, config)
    state = eager.state_dict()
    ours.load_state_dict({name: state[hf_name] for name, hf_name in ours.hf_weights().items()})
    floor = make_component(nanollm.Call("swiglu", (("d_ff", TOP * args.d_expert),)), config)
    initialize(floor)

    x = torch.randn(1, args.tokens, args.d_model, requires_grad=True)
    probe = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], eager(x), atol=1e-4, rtol=1e-4)  # the same layer, computed two ways

    def forced_grouped_mm() -> None:
        with mock.patch.object(dispatch, "use_grouped_mm", lambda rows: True):
            train_step(ours, x, probe)()

    ways = {
        "nanollm": train_step(ours, x, probe),
        "nanollm forced to grouped_mm": forced_grouped_mm,
        "transformers eager (per-expert loop)": train_step(eager, x, probe),
        "transformers grouped_mm": train_step(grouped, x, probe),
        f"floor: dense SwiGLU, width {TOP}x{args.d_expert}": train_step(floor, x, probe),
    }
    for run in ways.values():  # warm-up: allocator, kernels, first-call paths
        run()
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, run in ways.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)

    ours_name, eager_name, floor_name = "nanollm", "transformers eager (per-expert loop)", list(ways)[-1]

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(seconds[a], seconds[b]))

    table = Table(
        title=f"one MoE layer, forward + backward: {args.tokens} tokens, {EXPERTS} experts, top-{TOP}, d_model {args.d_model}, "
        f"d_expert {args.d_expert}, fp32, {torch.get_num_threads()} threads, {args.rounds} rounds",
        title_justify="left",
    )
    for column in ("way", "median s", "min s", "x floor", "eager loop / this"):
        table.add_column(column, justify="left" if column == "way" else "right")
    for name in ways:
        table.add_row(
            name, f"{statistics.median(seconds[name]):.3f}", f"{min(seconds[name]):.3f}",
            f"{ratio(name, floor_name):.2f}", f"{ratio(eager_name, name):.2f}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"nanollm / floor = {ratio(ours_name, floor_name):.2f} (target <= 1.3); "
        f"transformers eager / nanollm = {ratio(eager_name, ours_name):.2f} (target >= 1.2)"
    )


if __name__ == "__main__":
    main()
