"""How fast the attention components train: each beside transformers' own module, or sparse beside dense.

Run: python bench/attention.py [--lengths 512 2048 8192] [--rounds R] [--long-rounds R] [--threads K] [--cases NAME ...].
Every case is one attention layer's forward + backward (input gradient included) in fp32 on the CPU, batch 1, timed per
token; lengths of 8192 and more run `--long-rounds` rounds (1) without a warm-up call, as transformers' eager T x T
attention takes tens of seconds a step there:

- `gated`: `global(gate=elementwise)` (Qwen3-Next's layout: per-head QK-norm, a quarter of each head rotated) against
  transformers' Qwen3NextAttention, eager;
- `mla`: `mla` (training form, query latent) against transformers' DeepseekV3Attention, eager;
- `dsa`: `dsa` keeping 1/8 of the keys (topk = T/8; its indexer's KL loss included) against full causal attention of the
  same shape: `mla(absorb=true)`, the same latent attention over every earlier key (and, for information, MLA's training
  form). Beside its ratio it prints the bound the machine sets: the bytes DSA's gathers must move (each query's chosen
  latents gathered in forward and again in backward, their gradients added back) at the gather bandwidth measured here,
  and the products it keeps at the measured matmul rate, against full attention's measured time.

Cases are a list (`CASES`): a case builds its ways for a length and names the ratio it reports with its target, so
other components' cases sit beside these. The ways of a case run round-robin, so machine load hits them alike; ratios
are medians over rounds of ratios within one round. The machine's fp32 matmul rate is printed beside them.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table
from train_throughput import matmul_rate
from transformers import DeepseekV3Config, Qwen3NextConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextAttention, Qwen3NextRotaryEmbedding

from nanollm.compiler import initialize, make_component, make_table
from nanollm.components import complete
from nanollm.components.attention.dsa import ATTEND_BLOCK_KEYS
from nanollm.ir import Call, ModelConfig

D_MODEL, HEADS = 512, 8
CONFIG = ModelConfig(d_model=D_MODEL, n_heads=HEADS, n_kv_heads=2, head_dim=64, qk_norm="head", rope_theta=1e4)
MLA = dict(kv_lora_rank=64, q_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
INTERLEAVED = Call("rope", (("theta", 1e4), ("interleaved", True)))
LONG = 8192  # lengths from here run --long-rounds rounds without a warm-up call

Way = Callable[[], None]


@dataclass(frozen=True)
class Case:
    """One comparison: its ways at a length, and the ratio it reports (time of `numerator` / time of `denominator`, ways
    named by their start) with its target."""

    name: str
    build: Callable[[int], dict[str, Way]]
    numerator: str
    denominator: str
    target: str  # e.g. ">= 1.0"
    bound: Callable[[int, dict[str, list[float]], float], str] | None = None  # what the machine allows: (length, seconds, matmul rate)

    def meets(self, ratio: float) -> bool:
        """Whether a measured ratio meets the target."""
        bound = float(self.target.split()[1])
        return ratio >= bound if self.target.startswith(">=") else ratio <= bound


def ours(call: Call, length: int) -> Way:
    """Forward + backward of a nanollm mixer with its own rotary tables (and its auxiliary loss, if it has one)."""
    module = make_component(complete(call, "mixer", CONFIG), CONFIG)
    initialize(module)
    tables = make_table(module.rotary)(torch.arange(length))
    return step(lambda x: module(x, *tables), module, length)


def theirs(module: torch.nn.Module, rotary: torch.nn.Module, length: int) -> Way:
    """Forward + backward of a transformers attention module (eager) with its causal mask and rotary tables."""
    x = torch.zeros(1, length, D_MODEL)
    tables = rotary(x, torch.arange(length)[None])
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    return step(lambda x: module(x, position_embeddings=tables, attention_mask=mask)[0], module, length)


def step(forward: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]], module: torch.nn.Module, length: int
         ) -> Way:
    """One training step's work on a layer: forward, backward of its output against a fixed probe (plus its auxiliary loss),
    input gradient included."""
    x = torch.randn(1, length, D_MODEL, requires_grad=True)
    probe = torch.randn(1, length, D_MODEL)

    def run() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        result = forward(x)
        out, aux = result if isinstance(result, tuple) else (result, 0.0)
        ((out * probe).sum() + aux).backward()

    return run


def gated(length: int) -> dict[str, Way]:
    hf = Qwen3NextConfig(hidden_size=D_MODEL, num_attention_heads=HEADS, num_key_value_heads=2, head_dim=64, num_hidden_layers=1,
                         layer_types=["full_attention"], partial_rotary_factor=0.25,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4}, attn_implementation="eager")
    rope = Call("rope", (("theta", 1e4), ("fraction", 0.25)))
    return {"nanollm global(gate=elementwise)": ours(Call("global", (("gate", "elementwise"), ("rope", rope))), length),
            "transformers Qwen3NextAttention": theirs(Qwen3NextAttention(hf, 0), Qwen3NextRotaryEmbedding(hf), length)}


def mla(length: int) -> dict[str, Way]:
    hf = DeepseekV3Config(hidden_size=D_MODEL, num_attention_heads=HEADS, num_key_value_heads=HEADS, **MLA,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e4}, attn_implementation="eager")
    return {"nanollm mla": ours(Call("mla", (*MLA.items(), ("rope", INTERLEAVED))), length),
            "transformers DeepseekV3Attention": theirs(DeepseekV3Attention(hf, 0), DeepseekV3RotaryEmbedding(hf), length)}


INDEXER = {"index_heads": 4, "index_head_dim": 32}


def dsa(length: int) -> dict[str, Way]:
    latent = (*MLA.items(), ("rope", INTERLEAVED))
    return {f"nanollm dsa(topk={length // 8})": ours(Call("dsa", (("topk", length // 8), *INDEXER.items(), *latent)), length),
            "full: mla(absorb=true)": ours(Call("mla", (*latent, ("absorb", True))), length),
            "full: mla (training form)": ours(Call("mla", latent), length)}


def gather_rate(length: int) -> float:
    """Bytes per second index_select moves gathering DSA's key rows (kv_lora_rank + qk_rope_head_dim wide, fp32) as its
    blocks of queries do: ATTEND_BLOCK_KEYS random rows of a length-row table at a time; median of 20."""
    keys = torch.randn(length, MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"])
    rows = torch.randint(0, length, (ATTEND_BLOCK_KEYS,))
    times = []
    for _ in range(21):
        start = time.perf_counter()
        keys.index_select(0, rows)
        times.append(time.perf_counter() - start)
    return rows.numel() * keys.shape[1] * 4 / statistics.median(times[1:])


def gathered_matmul_rate(length: int) -> float:
    """FLOP/s of the products DSA's attention runs per block of queries: each query's HEADS rows against its own topk gathered
    keys, (block, HEADS, W) x (block, W, topk) batched; median of 10. Only HEADS rows share a gathered key set, so this runs far
    below the square matmul rate."""
    topk, width = length // 8, MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]
    block = max(1, ATTEND_BLOCK_KEYS // topk)
    q, picked = torch.randn(block, HEADS, width), torch.randn(block, topk, width)
    times = []
    for _ in range(11):
        start = time.perf_counter()
        torch.bmm(q, picked.transpose(1, 2))
        times.append(time.perf_counter() - start)
    return 2 * block * HEADS * width * topk / statistics.median(times[1:])


def dsa_bound(length: int, seconds: dict[str, list[float]], matmul: float) -> str:
    """What the machine allows DSA: its compulsory gathering and products at the rates measured here (the products at the rate
    of their own batched shape), over full attention's time."""
    topk, width, values = length // 8, MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"], MLA["kv_lora_rank"]
    moved = 3 * length * topk * width * 4  # gathered in forward, again in backward, and the gradients added back
    rate = gather_rate(length)
    index_width = INDEXER["index_heads"] * (INDEXER["index_head_dim"] + 1)
    # attention over the kept keys (forward, and backward at twice it), the indexer's causal scoring (forward only), its loss
    products = 2 * (3 * HEADS * length * topk * (width + values) + index_width * (length - topk) * (length + topk) // 2
                    + 3 * length * topk * index_width)
    gathered = gathered_matmul_rate(length)
    gathering, computing = moved / rate, products / gathered
    full = statistics.median(seconds["full: mla(absorb=true)"])
    return (f"bound: gathers move {moved / 1e9:.1f} GB at {rate / 1e9:.1f} GB/s = {gathering:.2f} s; kept products {products / 1e9:.0f} "
            f"GFLOP at {gathered / 1e9:.1f} GFLOP/s (their batched shape; {products / matmul:.2f} s at the square rate) = {computing:.2f} s; "
            f"full attention measured {full:.2f} s: DSA can be no faster than {max(gathering, computing) / full:.2f}x (overlapped) to "
            f"{(gathering + computing) / full:.2f}x (in turn) of it")


CASES = [
    Case("gated", gated, "transformers", "nanollm", ">= 1.0"),  # transformers' time / ours: a speed-up
    Case("mla", mla, "transformers", "nanollm", ">= 1.0"),
    Case("dsa", dsa, "nanollm dsa", "full: mla(absorb=true)", "<= 0.35", dsa_bound),  # sparse time / dense time
]


def measure(ways: dict[str, Way], rounds: int, warm_up: bool = True) -> dict[str, list[float]]:
    """Seconds of each way per round, the ways taking turns, after one warm-up call each (if asked)."""
    for run in ways.values() if warm_up else ():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, run in ways.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long-rounds", type=int, default=1, help=f"rounds at lengths of {LONG} and more (no warm-up call)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--cases", nargs="+", default=[case.name for case in CASES], choices=[case.name for case in CASES])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    console = Console()
    matmul = matmul_rate()
    console.print(f"fp32 matmul rate (1024^3): {matmul / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} threads")
    table = Table(title=f"one attention layer, forward + backward, fp32, batch 1, d_model {D_MODEL}, {HEADS} heads, "
                        f"{args.rounds} rounds ({args.long_rounds} from T = {LONG})", title_justify="left")
    for column in ("case", "T", "way", "median us/token", "ratio", "target"):  # ratio: the case's numerator / denominator
        table.add_column(column, justify="left" if column in ("case", "way") else "right")
    for case in (case for case in CASES if case.name in args.cases):
        lengths = [length for length in args.lengths if case.name != "dsa" or length >= 2048]  # 1/8 of a short prefix is few keys
        for length in lengths:
            ways = case.build(length)
            seconds = measure(ways, args.long_rounds, warm_up=False) if length >= LONG else measure(ways, args.rounds)
            numerator = next(name for name in ways if name.startswith(case.numerator))
            denominator = next(name for name in ways if name.startswith(case.denominator))
            ratio = statistics.median(n / d for n, d in zip(seconds[numerator], seconds[denominator]))
            for i, (name, times) in enumerate(seconds.items()):
                verdict = f"{case.target} {'ok' if case.meets(ratio) else 'MISSED'}"
                table.add_row(case.name if i == 0 else "", str(length) if i == 0 else "", name,
                              f"{statistics.median(times) / length * 1e6:.1f}", f"{ratio:.2f}" if i == 0 else "", verdict if i == 0 else "")
            console.print(f"{case.name} T={length}: {numerator} / {denominator} = {ratio:.2f} ({case.target})")
            if case.bound:
                console.print(f"{case.name} T={length} {case.bound(length, seconds, matmul)}")
    console.print(table)


if __name__ == "__main__":
    main()
