"""How fast the recurrent mixers train and decode on the CPU: each chunked form beside transformers' own torch path.

Run: python bench/linear_attention.py [--lengths 2048 8192] [--rounds R] [--threads K] [--cases NAME ...]. Each case is
one layer built twice with the same weights, nanollm's (loaded through its `hf_weights`) and transformers' (its pure-torch path, the
one a machine without the CUDA kernels runs), checked equal first; each way times forward + backward of the whole
layer on one sequence in fp32, input gradient included:

- lightning: MiniMax's `MiniMaxLightningAttention` (a Python loop over blocks of 256) against `lightning`, at the
  same block size and at a chunk of 64;
- mamba2: Nemotron-H's `NemotronHMamba2Mixer` on its torch chunk scan (`mamba2_chunk_scan`) against `mamba2`, at its chunk
  of 128 and at 64;
- shortconv: LFM2's `Lfm2ShortConv` on its slow path (`causal_conv1d_fn`) against `shortconv`;
- gated_deltanet: Qwen3-Next's `Qwen3NextGatedDeltaNet` on `torch_chunk_gated_delta_rule` against `gdn` (chunk 64);
- kda: Kimi-Linear's `KimiLinearDeltaAttention` on `chunk_kimi_delta_attention` against `kda` (chunk 64).

For gdn and kda, also the kernels the layer must run whatever its recurrence, alone at the same shapes: the input
projections and gates, the short convolution and the output projection, forward + backward; transformers' time over
theirs is the ceiling of any speed-up (their own row, tighter than the GEMMs' below).

Then, per nanollm case, the cost per token at the longest length over the shortest (flat in T: within 1.2x), and the
recurrent form: the time of one decoding step (the layer's `decode` of one token) at the end of each length, the tokens
before it prefilled by `decode` in the chunked form (independent of the context: the state has one size). The ways
run round-robin, so load on a shared machine falls on all alike; ratios are medians of per-round ratios. Beside them, the
layer's linear maps' matrix products alone at the same shapes (forward, input and weight gradients), timed in the same rounds,
and the ceiling they set: transformers' time over theirs, the most any implementation of the layer could gain. The fp32
matmul rate of the machine is printed with them. Target: nanollm at least 1.5x faster than transformers' torch path at
every length.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from attention import measure  # this folder's scripts: the same interleaved timing
from rich.console import Console
from rich.table import Table
from train_throughput import matmul_rate  # and the same measure of the machine
from transformers import (
    KimiLinearConfig,
    Lfm2Config,
    MiniMaxConfig,
    NemotronHConfig,
    Qwen3NextConfig,
)
from transformers.models.kimi_linear.modeling_kimi_linear import (
    KimiLinearDeltaAttention,
)
from transformers.models.lfm2.modeling_lfm2 import Lfm2ShortConv
from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

import nanollm
from nanollm.compiler import make_component
from nanollm.components import complete

D_MODEL = 512
FLOOR = "proj + conv floor"
GEMMS = "the layer's GEMMs alone"


@dataclass
class Case:
    """One layer: transformers' module and nanollm's calls of it (name -> call), built from one config."""

    name: str
    theirs: Callable[[], torch.nn.Module]
    ours: dict[str, nanollm.Call]
    floor: bool = False  # also time the layer's projections and convolution alone (a delta-rule mixer's `project`)


def minimax_config() -> MiniMaxConfig:
    return MiniMaxConfig(hidden_size=D_MODEL, num_attention_heads=8, head_dim=64, num_hidden_layers=4, block_size=256,
                         layer_types=["linear_attention"] * 4)


def nemotron_config() -> NemotronHConfig:
    return NemotronHConfig(hidden_size=D_MODEL, mamba_num_heads=16, mamba_head_dim=64, ssm_state_size=64, n_groups=2, chunk_size=128,
                           layers_block_type=["linear_attention"])


def lfm2_config() -> Lfm2Config:
    return Lfm2Config(hidden_size=D_MODEL, num_hidden_layers=1, layer_types=["conv"])


def qwen3_next_config() -> Qwen3NextConfig:
    return Qwen3NextConfig(hidden_size=D_MODEL, linear_num_value_heads=8, linear_num_key_heads=4, linear_key_head_dim=64,
                           linear_value_head_dim=64, num_hidden_layers=1, layer_types=["linear_attention"])


def kimi_config() -> KimiLinearConfig:
    # 4 heads of 64: transformers' KDA materialises (chunk x chunk x head_dim) decays per chunk and head; its rms_norm_eps is 1e-5
    return KimiLinearConfig(hidden_size=D_MODEL, num_hidden_layers=2, linear_attn_config={"num_heads": 4, "head_dim": 64})


class Called(torch.nn.Module):
    """A transformers layer called on the hidden states alone (position embeddings and masks None)."""

    def __init__(self, layer: torch.nn.Module, extra: int = 0) -> None:
        super().__init__()
        self.layer, self.extra = layer, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x, *([None] * self.extra))
        return out[0] if isinstance(out, tuple) else out


def call(name: str, **args: Any) -> nanollm.Call:
    return nanollm.Call(name, tuple(args.items()))


CASES = [
    Case("lightning", lambda: Called(MiniMaxLightningAttention(minimax_config(), layer_idx=1), extra=2),
         {"lightning (chunk 256)": call("lightning", heads=8, head_dim=64, decay=1 - 1 / (3 + 1e-5) + 1e-5, chunk=256),
          "lightning (chunk 64)": call("lightning", heads=8, head_dim=64, decay=1 - 1 / (3 + 1e-5) + 1e-5, chunk=64)}),
    Case("mamba2", lambda: Called(NemotronHMamba2Mixer(nemotron_config(), layer_idx=0)),
         {"mamba2 (chunk 128)": call("mamba2", heads=16, head_dim=64, state=64, groups=2, conv=4, chunk=128),
          "mamba2 (chunk 64)": call("mamba2", heads=16, head_dim=64, state=64, groups=2, conv=4, chunk=64)}),
    Case("shortconv", lambda: Called(Lfm2ShortConv(lfm2_config(), layer_idx=0)), {"shortconv": call("shortconv", kernel=3)}),
    Case("gated_deltanet", lambda: Called(Qwen3NextGatedDeltaNet(qwen3_next_config(), layer_idx=0)),
         {"gdn (chunk 64)": call("gdn", heads=8, key_heads=4, head_dim=64, value_dim=64, layout="qwen3_next")}, floor=True),
    Case("kda", lambda: Called(KimiLinearDeltaAttention(kimi_config(), layer_idx=0)), {"kda (chunk 64)": call("kda", heads=4, head_dim=64, gate_eps=1e-5)},
         floor=True),
]


class Unavoidable(torch.nn.Module):
    """What a delta-rule layer must run whatever its recurrence: its input projections and gates (`project`), the short
    convolution, and the output projection (fed the values and the output gate), forward and backward at the same shapes."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, gates = self.layer.project(x)
        values = self.layer.conv1d(qkv)[..., -self.layer.value_width:]
        out = self.layer.o_proj(values + gates.output.reshape(values.shape))
        return out + (gates.decay.flatten(2).sum(-1) + gates.beta.sum(-1))[..., None]


def train_step(module: torch.nn.Module, x: torch.Tensor, probe: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of one layer (its output dotted with a fixed probe), gradients cleared first."""

    def run() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        out.mul(probe).sum().backward()

    return run


def pair(case: Case) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """transformers' layer with random weights, and nanollm's layers carrying the same weights."""
    torch.manual_seed(0)
    theirs = case.theirs()
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.normal_(0, 0.05) if parameter.dim() > 1 else parameter.uniform_(0.5, 1.5)
    state = theirs.layer.state_dict()
    config = nanollm.ModelConfig(d_model=D_MODEL)
    ours = {}
    for name, ours_call in case.ours.items():
        module = make_component(complete(ours_call, "mixer", config), config)
        module.load_state_dict({mine: state[hf_name] for mine, hf_name in module.hf_weights().items()})
        ours[name] = module
    return theirs, ours


def projection_gemms(module: torch.nn.Module, length: int) -> Callable[[], None]:
    """The matrix products of the layer's linear maps alone, at its shapes: per map (in -> out) on `length` tokens, the
    forward x W^T, the input gradient dy W and the weight gradient dy^T x: what the layer must do at least, whatever its
    mixing (the inputs of every map need gradients in this benchmark)."""
    operands = []
    for linear in (m for m in module.modules() if isinstance(m, torch.nn.Linear)):
        operands.append((torch.randn(length, linear.in_features), torch.randn(length, linear.out_features), linear.weight.detach()))

    def run() -> None:
        for x, grad, weight in operands:
            x @ weight.T, grad @ weight, grad.T @ x

    return run


@torch.no_grad()
def step_seconds(module: torch.nn.Module, x: torch.Tensor, timed: int = 64) -> float:
    """Median time of one decoding step (`decode` of one token, as generation runs it) over the last `timed` tokens of x,
    the tokens before them prefilled through `decode` in the chunked form."""
    state = module.state(1, x.shape[1], x.device, x.dtype)
    context = x.shape[1] - timed
    module.decode(state, 0, x[:, :context])
    times = []
    for t in range(context, x.shape[1]):
        start = time.perf_counter()
        module.decode(state, t, x[:, t:t + 1])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--cases", nargs="+", choices=[case.name for case in CASES], help="the layers to time (default: all)")
    args = parser.parse_args()
    cases = [case for case in CASES if args.cases is None or case.name in args.cases]
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    console.print(f"fp32 matmul rate (1024^3): {matmul_rate() / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} threads")
    table = Table(title=f"forward + backward of one layer, d_model {D_MODEL}, fp32, batch 1 (ratio: transformers' time / nanollm's)")
    for column in ("layer", "T", "transformers ms", "nanollm ms", "speed-up", "ns/token", "bound ms", "ceiling"):
        table.add_column(column, justify="right" if column != "layer" else "left")
    per_token: dict[str, dict[int, float]] = {}
    for case in cases:
        theirs, ours = pair(case)
        for length in args.lengths:
            x = torch.randn(1, length, D_MODEL, generator=torch.Generator().manual_seed(length), requires_grad=True)
            probe = torch.randn(1, length, D_MODEL, generator=torch.Generator().manual_seed(length + 1))
            with torch.no_grad():
                expected = theirs(x[:, :600])
                for module in ours.values():
                    torch.testing.assert_close(module(x[:, :600]), expected, atol=1e-4, rtol=1e-4)
            ways = {"transformers": train_step(theirs, x, probe), **{name: train_step(m, x, probe) for name, m in ours.items()},
                    GEMMS: projection_gemms(next(iter(ours.values())), length)}
            if case.floor:
                ways[FLOOR] = train_step(Unavoidable(next(iter(ours.values()))), x, probe)
            seconds = measure(ways, args.rounds)
            # the most any layer doing these products could gain on transformers: their time over the products' alone
            ceiling = statistics.median(t / g for t, g in zip(seconds["transformers"], seconds[GEMMS]))
            for name in ours:
                ratio = statistics.median(t / o for t, o in zip(seconds["transformers"], seconds[name]))
                ours_time = statistics.median(seconds[name])
                per_token.setdefault(name, {})[length] = ours_time / length
                table.add_row(name, str(length), f"{1e3 * statistics.median(seconds['transformers']):.1f}", f"{1e3 * ours_time:.1f}",
                              f"{ratio:.2f}x", f"{1e9 * ours_time / length:.0f}", f"{1e3 * statistics.median(seconds[GEMMS]):.1f}",
                              f"{ceiling:.2f}x")
            if case.floor:  # the projections, gates and convolution alone: a tighter ceiling than the GEMMs'
                floor = statistics.median(t / f for t, f in zip(seconds["transformers"], seconds[FLOOR]))
                table.add_row(f"  {FLOOR}", str(length), "", "", "", "", f"{1e3 * statistics.median(seconds[FLOOR]):.1f}", f"{floor:.2f}x")
    console.print(table)
    short, long = min(args.lengths), max(args.lengths)
    flat = Table(title=f"nanollm per token at T = {long} over T = {short} (target <= 1.2), and one decoding step at the end of each")
    for column in ("layer", "train per-token ratio", f"step after {short} (us)", f"step after {long} (us)", "step ratio"):
        flat.add_column(column, justify="right" if column != "layer" else "left")
    for case in cases:
        _, ours = pair(case)
        for name, module in ours.items():
            steps: dict[int, list[float]] = {short: [], long: []}
            for _ in range(args.rounds):  # the two contexts alternate, so load falls on both alike
                for length in (short, long):
                    steps[length].append(step_seconds(module, torch.randn(1, length, D_MODEL)))
            ratio = statistics.median(at_long / at_short for at_short, at_long in zip(steps[short], steps[long]))
            flat.add_row(name, f"{per_token[name][long] / per_token[name][short]:.2f}", f"{1e6 * statistics.median(steps[short]):.0f}",
                         f"{1e6 * statistics.median(steps[long]):.0f}", f"{ratio:.2f}")
    console.print(flat)


if __name__ == "__main__":
    main()
