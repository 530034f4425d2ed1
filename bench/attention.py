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
  form). Beside its ratio it prints the floor of DSA's gathered form: every part of the work it does, forward and
  backward (the gathers of each query's chosen latents and index keys, their gradients added back, the products over the
  kept keys at their own narrow batched shapes, the softmax's exponentials, the indexer's causal scoring and each row's
  top-k, its KL loss), each timed in the same run on one block at its shape and scaled to the sequence, summed, over full
  attention's measured time; and its attention products at the square matmul rate, what a form that ran them as
  square GEMMs would need instead.

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
from nanollm.components.attention.dsa import ATTEND_BLOCK_KEYS, INDEX_BLOCK, LightningIndexer
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


def dsa_call(length: int) -> Call:
    """The DSA layer the case times: T/8 keys kept."""
    return Call("dsa", (("topk", length // 8), *INDEXER.items(), *MLA.items(), ("rope", INTERLEAVED)))


def dsa(length: int) -> dict[str, Way]:
    latent = (*MLA.items(), ("rope", INTERLEAVED))
    return {f"nanollm dsa(topk={length // 8})": ours(dsa_call(length), length),
            "full: mla(absorb=true)": ours(Call("mla", (*latent, ("absorb", True))), length),
            "full: mla (training form)": ours(Call("mla", latent), length)}


def median_seconds(run: Callable[[], object], repeats: int = 10) -> float:
    """Median seconds of one call of `run` over `repeats` calls, after a warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def surroundings(length: int) -> Way:
    """Forward + backward of the DSA layer's work outside its choice and attention over the chosen keys (which full attention
    has too): its projections, latent norms, RoPE, the queries' absorption, the output projection, the indexer's projections;
    one add stands in for the attention core."""
    module = make_component(complete(dsa_call(length), "mixer", CONFIG), CONFIG)
    initialize(module)
    cos, sin = make_table(module.rotary)(torch.arange(length))
    x, probe = torch.randn(1, length, D_MODEL, requires_grad=True), torch.randn(1, length, D_MODEL)

    def run() -> None:
        latent, k_rope = module.latents(x, cos, sin)
        q_nope, q_rope, q_latent = module.queries(x, cos, sin, latent)
        index_q, index_k, index_weights = module.indexer.project(x.detach(), q_latent.detach(), cos, sin, module.layout)
        heads = module.absorbed_queries(q_nope, q_rope)[..., : module.kv_lora_rank] + latent  # (B, H, T, r): the core's shape
        out = module.output(x, heads @ module.up_projections()[1].transpose(1, 2))
        ((out * probe).sum() + index_q.sum() + index_k.sum() + index_weights.sum() + k_rope.sum()).backward()

    return run


def dsa_floor(length: int) -> dict[str, float]:
    """Seconds of each part of the work exact DSA must do at this length, keeping length / 8 keys, forward and backward (the
    kept scores recomputed in backward rather than held, T x heads x topk floats): each part timed here on one block of
    queries at the shape the computation has, in its buffers, and scaled to the sequence. A part timed alone, on inputs its
    previous call left in the caches, runs at its best, so their sum is a floor, not an estimate of DSA's time."""
    topk, width, values = length // 8, MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"], MLA["kv_lora_rank"]
    index_heads, index_dim = INDEXER["index_heads"], INDEXER["index_head_dim"]
    block = max(1, ATTEND_BLOCK_KEYS // topk)  # queries per block
    blocks = length / block
    rows = torch.randint(0, length, (block * topk,))
    parts = {"the layer around them: projections, norms, RoPE, absorption, indexer's projections": median_seconds(surroundings(length), 3)}
    for name, wide in (("attention", width), ("indexer loss", index_dim)):  # each query's chosen rows: its latents, its index keys
        table, picked = torch.randn(length, wide), torch.empty(block * topk, wide)
        gather = median_seconds(lambda table=table, picked=picked: torch.index_select(table, 0, rows, out=picked))
        parts[f"{name}: gathers, forward and backward"] = 2 * blocks * gather
        parts[f"{name}: keys' gradient added back"] = blocks * median_seconds(lambda table=table, picked=picked: table.index_add_(0, rows, picked))
    # attention over the kept keys: every head's row against the query's own gathered keys
    q, picked, weights = torch.randn(block, HEADS, width), torch.randn(block, topk, width), torch.rand(block, HEADS, topk)
    grad_out, both, factors = torch.randn(block, HEADS, values), torch.randn(block, 2 * HEADS, topk), torch.randn(block, 2 * HEADS, width)
    scores = median_seconds(lambda: torch.bmm(q, picked.transpose(1, 2)))
    parts["attention: products, forward (scores, values)"] = blocks * (scores + median_seconds(lambda: torch.bmm(weights, picked[..., :values])))
    parts["attention: products, backward (scores again, their gradient, queries', keys' and values')"] = blocks * (
        scores + median_seconds(lambda: torch.bmm(grad_out, picked[..., :values].transpose(1, 2)))
        + median_seconds(lambda: torch.bmm(weights, picked)) + median_seconds(lambda: torch.bmm(both.transpose(1, 2), factors)))
    parts["attention: softmax exponentials, forward and backward"] = 2 * blocks * median_seconds(lambda: weights.exp())
    # the indexer: causal scoring by blocks of INDEX_BLOCK queries against their prefix, the top-k of each row
    starts = range(topk, length, INDEX_BLOCK)
    pairs = sum((min(start + INDEX_BLOCK, length) - start) * min(start + INDEX_BLOCK, length) for start in starts)
    index_q, index_k = torch.randn(1, INDEX_BLOCK, index_heads, index_dim), torch.randn(1, length, index_dim)
    index_weights = torch.randn(1, INDEX_BLOCK, index_heads)
    per_pair = pairs / (INDEX_BLOCK * length)
    parts["indexer: causal scoring"] = per_pair * median_seconds(lambda: LightningIndexer.score(index_q, index_k, index_weights))
    index = torch.randn(INDEX_BLOCK, length)
    parts["indexer: top-k of each row"] = per_pair * median_seconds(lambda: index.topk(topk, dim=-1, sorted=False))
    # its KL loss over the chosen keys: scores forward, again in backward with the gradients of queries, keys and weights
    loss_q, loss_k, loss_w = torch.randn(block, index_heads, index_dim), torch.randn(block, topk, index_dim), torch.rand(block, 1, index_heads)
    relu = torch.rand(block, index_heads, topk)
    loss_scores = median_seconds(lambda: torch.bmm(loss_q, loss_k.transpose(1, 2))) + median_seconds(lambda: torch.bmm(loss_w, relu))
    parts["indexer loss: products, forward and backward"] = blocks * (
        2 * loss_scores + median_seconds(lambda: torch.bmm(relu, loss_k)) + median_seconds(lambda: torch.bmm(relu.transpose(1, 2), loss_q))
        + median_seconds(lambda: torch.bmm(relu, torch.rand(block, topk, 1))))
    return parts


def dsa_bound(length: int, seconds: dict[str, list[float]], matmul: float) -> str:
    """The floor of DSA's gathered form: every part of its exact work (`dsa_floor`) at the speed measured here, in turn, over
    full attention's measured time; the parts listed."""
    parts = dsa_floor(length)
    floor, full = sum(parts.values()), statistics.median(seconds["full: mla(absorb=true)"])
    dsa_time = statistics.median(next(times for name, times in seconds.items() if name.startswith("nanollm dsa")))
    topk, width, values = length // 8, MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"], MLA["kv_lora_rank"]
    products = 2 * length * topk * HEADS * (5 * width + 2 * values)  # forward H (W + V), backward H (2 W + V) and 2H W per kept pair
    listed = "".join(f"\n  {name}: {part:.3f} s" for name, part in sorted(parts.items(), key=lambda item: -item[1]))
    return (f"bound: DSA's exact work timed part by part here sums to {floor:.2f} s (DSA measured {dsa_time:.2f} s, full attention "
            f"{full:.2f} s): in this form DSA can be no faster than {floor / full:.2f}x full attention on this machine; its attention "
            f"products, {products / 1e9:.0f} GFLOP, would take {products / matmul:.2f} s at the square matmul rate{listed}")


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
