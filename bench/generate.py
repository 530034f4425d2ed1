"""How fast nanollm decodes: tokens per second beside transformers' `generate`, and the hybrids' per-token time at a long
context against a short one.

Run: python bench/generate.py [--rounds R] [--new-tokens N] [--threads K]. Three tiny models, fp32 on the CPU, the same
weights on both sides (nanollm imports the transformers model with from_hf):

- dense: Qwen3-shaped (d_model 256, 4 layers, 8 heads of 32, 4 KV heads, SwiGLU 768), every layer global;
- hybrid: the same with layers 1-5 of each 6 sliding (window 128) and every sixth global (Gemma 3's 5:1), 6 layers;
- recurrent: Qwen3.5-shaped, the same widths, three gated DeltaNet layers (8 value heads, 4 key heads of 32) to one
  global (3:1), 8 layers; transformers runs its torch path (no fla kernels on a CPU), nanollm decodes the recurrent
  layers from their fixed-size states, a prompt prefilled in the chunked form.

Per model and batch (1 and 8): a 32-token prompt, N new tokens greedy, the prefill included on both sides;
nanollm's `Decoder.generate`, eager and compiled (`Decoder(compiled=True)`, `nanollm generate --compile`; its one-time
compilation is done before the rounds and reported apart), against `model.generate(do_sample=False)` with its default
DynamicCache. Then each
hybrid's per-token decode time after a 4,096-token context against a 256-token one (nanollm only; the ring buffers
and recurrent states bound the sliding and DeltaNet layers' work, the global layers' keys grow). The ways run round-robin, so machine load falls
on them alike; ratios are medians over rounds of ratios measured within a round. The fp32 matmul rate of the
machine is printed beside them. Targets: nanollm >= 1.5x transformers at batch 1; 4k within 1.3x of 256.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table
from train_throughput import (
    matmul_rate,  # bench/ is on the path of a script run from it
)
from transformers import (
    PreTrainedModel,
    Qwen3_5ForCausalLM,
    Qwen3_5TextConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import nanollm
from nanollm.decode import Decoder, generated
from nanollm.hf import arch_from_config

SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
             max_position_embeddings=8192, eos_token_id=None, bos_token_id=None, pad_token_id=0)
PROMPT = 32


def model_pair(layer_types: list[str]) -> tuple[PreTrainedModel, Decoder, Decoder]:
    """A random transformers model of these layer types (SDPA attention): Qwen3, or Qwen3.5 with linear_attention layers;
    and nanollm's decoders of the same weights, eager and compiled."""
    torch.manual_seed(0)
    sliding = "sliding_attention" in layer_types
    if "linear_attention" in layer_types:
        config = Qwen3_5TextConfig(**SHAPE, num_hidden_layers=len(layer_types), layer_types=layer_types, linear_num_value_heads=8,
                                   linear_num_key_heads=4, linear_key_head_dim=32, linear_value_head_dim=32, attn_implementation="sdpa")
        hf = Qwen3_5ForCausalLM(config).eval()
    else:
        config = Qwen3Config(**SHAPE, num_hidden_layers=len(layer_types), layer_types=layer_types, use_sliding_window=sliding,
                             sliding_window=128 if sliding else None, attn_implementation="sdpa")
        hf = Qwen3ForCausalLM(config).eval()
    hf.generation_config.eos_token_id = None
    decoder = Decoder(nanollm.from_hf(hf).eval(), arch_from_config(config), context=SHAPE["max_position_embeddings"])
    return hf, decoder, Decoder(decoder.model, decoder.arch, decoder.context, compiled=True)


def seconds(run: Callable[[], object]) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


@torch.no_grad()
def step_time(decoder: Decoder, context: int, steps: int = 16) -> Callable[[], float]:
    """A function timing one decoding step after `context` tokens (median of `steps`), the prefill outside the timing."""

    def run() -> float:
        states = decoder.states(1, context + steps)
        decoder.step(torch.randint(0, SHAPE["vocab_size"], (1, context)), 0, states)
        times = []
        token = torch.zeros(1, 1, dtype=torch.long)
        for position in range(context, context + steps):
            start = time.perf_counter()
            decoder.step(token, position, states)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return run


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"dense": model_pair(["full_attention"] * 4),
              "hybrid": model_pair(["sliding_attention"] * 5 + ["full_attention"]),
              "recurrent": model_pair((["linear_attention"] * 3 + ["full_attention"]) * 2)}
    console = Console()
    for name, (_, _, compiled) in models.items():  # the one-time compilation (prefill and step graphs, each batch size)
        spent = sum(seconds(lambda batch=batch, way=compiled: generated(way, torch.zeros(batch, PROMPT, dtype=torch.long), 2)) for batch in (1, 8))
        console.print(f"{name}: compiling the decoding step took {spent:.1f} s")
    rates, ratios, speeds = [matmul_rate()], {}, {}
    long_short: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, (hf, decoder, compiled) in models.items():
            for batch in (1, 8):
                prompt = torch.randint(0, SHAPE["vocab_size"], (batch, PROMPT))
                theirs = seconds(lambda hf=hf, prompt=prompt: hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                                                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens))
                ours = [seconds(lambda way=way, prompt=prompt: generated(way, prompt, args.new_tokens)) for way in (decoder, compiled)]
                ratios.setdefault((name, batch), []).append([theirs / t for t in ours])
                speeds.setdefault((name, batch), []).append([batch * args.new_tokens / t for t in (*ours, theirs)])
        for name in ("hybrid", "recurrent"):
            decoder = models[name][1]
            long_short.setdefault(name, []).append(step_time(decoder, 4096)() / step_time(decoder, 256)())
        rates.append(matmul_rate(repeats=5))

    table = Table(title=f"decoding, fp32 CPU, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds", title_justify="left")
    for column in ("model", "batch", "nanollm tokens/s", "compiled tokens/s", "transformers tokens/s", "nanollm / transformers",
                   "compiled / transformers"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for (name, batch), values in ratios.items():
        rates_of = [f"{statistics.median(v[k] for v in speeds[name, batch]):,.0f}" for k in range(3)]
        table.add_row(name, str(batch), *rates_of, *(f"{statistics.median(v[k] for v in values):.2f}x" for k in range(2)))
    console.print(table)
    for name, ratios_of_name in long_short.items():
        console.print(f"{name} per-token decode time, 4,096-token context / 256: {statistics.median(ratios_of_name):.2f}x (target <= 1.3x)")
    console.print(f"fp32 matmul 1024^3: {statistics.median(rates) / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
