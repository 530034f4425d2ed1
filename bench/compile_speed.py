"""How long `nanollm compile` takes: whole command, and the in-process analysis of every shipped file.

Run: python bench/compile_speed.py [--against CHECKOUT]. Timings are medians over a few runs; `import torch`
is measured in the same run as a yardstick, because this machine is shared and its absolute speed varies.
`--against` times the same command from another checkout of nanollm (e.g. `git worktree add ../old REV`),
the two taking turns, and prints the ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "archs" / "qwen3_0_6b.arch"
RUNS = 3


def wall(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Wall time of a command, process start to exit."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def median_wall(argv: list[str]) -> float:
    """Median wall time of a command over RUNS runs."""
    return statistics.median(wall(argv) for _ in range(RUNS))


def compared(argv: list[str], checkouts: list[Path], runs: int) -> list[float]:
    """Median wall times of the same command run from each checkout (its package first on the path), taking turns."""
    envs = [{**os.environ, "PYTHONPATH": str(checkout)} for checkout in checkouts]
    times = [[] for _ in checkouts]
    for _ in range(runs):
        for kept, env in zip(times, envs):
            kept.append(wall(argv, env))
    return [statistics.median(kept) for kept in times]


def first_analysis() -> float:
    """Analysis time of the baseline in a fresh process (includes one-time imports, e.g. torch._dynamo)."""
    code = (
        "import time, nanollm; c = nanollm.compile(%r); t = time.perf_counter(); c.analysis; "
        "print(time.perf_counter() - t)" % str(BASELINE)
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, help="another checkout of nanollm to time the same command from")
    parser.add_argument("--runs", type=int, default=7, help="turns each with --against")
    args = parser.parse_args()
    import nanollm
    import nanollm.analysis

    command_line = [sys.executable, "-m", "nanollm", "compile", str(BASELINE), "--json"]
    if args.against:
        ours, theirs = compared(command_line, [ROOT, args.against.resolve()], args.runs)
        Console().print(f"`nanollm compile qwen3_0_6b.arch --json`: this checkout {ours:.2f} s, {args.against} {theirs:.2f} s "
                        f"(ratio {ours / theirs:.3f}; medians of {args.runs}, taking turns)")
    command = median_wall(command_line)
    torch_import = median_wall([sys.executable, "-c", "import torch"])
    cold = first_analysis()

    nanollm.compile("global").analyze(64)  # one-time imports out of the way
    rows = []
    for path in sorted((ROOT / "archs").glob("*.arch")):
        lowers, analyses = [], []
        for _ in range(RUNS):
            nanollm.analysis._MACS.clear()  # count afresh: no FLOP counts kept from the previous run
            start = time.perf_counter()
            compiled = nanollm.compile(path)
            lowered = time.perf_counter()
            compiled.analyze(compiled.config.seq_len)
            lowers.append(lowered - start)
            analyses.append(time.perf_counter() - lowered)
        rows.append((path.name, compiled.config.n_layers, statistics.median(lowers), statistics.median(analyses)))

    table = Table(title="nanollm compile speed (median of %d)" % RUNS, title_justify="left")
    for name in ("measure", "seconds"):
        table.add_column(name, justify="left" if name == "measure" else "right")
    table.add_row("`nanollm compile qwen3_0_6b.arch --json`, process start to exit", f"{command:.2f}")
    table.add_row("`python -c 'import torch'` (yardstick)", f"{torch_import:.2f}")
    table.add_row("command minus torch import", f"{command - torch_import:.2f}")
    table.add_row("first analysis in a process (qwen3_0_6b; includes importing torch._dynamo)", f"{cold:.2f}")
    for name, layers, lower, analysis in rows:
        table.add_row(f"{name} ({layers} layers): parse+lower / analysis", f"{lower:.3f} / {analysis:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
