"""How long `nanollm compile` takes: whole command, and the in-process analysis of every shipped file.

Run: python bench/compile_speed.py. Timings are medians over a few runs; `import torch` is measured in
the same run as a yardstick, because this machine is shared and its absolute speed varies.
"""
from __future__ import annotations

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


def wall(argv: list[str]) -> float:
    """Median wall time of a command, process start to exit."""
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_analysis() -> float:
    """Analysis time of the baseline in a fresh process (includes one-time imports, e.g. torch._dynamo)."""
    code = (
        "import time, nanollm; c = nanollm.compile(%r); t = time.perf_counter(); c.analysis; "
        "print(time.perf_counter() - t)" % str(BASELINE)
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out)


def main() -> None:
    import nanollm
    import nanollm.analysis

    script = str(Path(sys.executable).parent / "nanollm")
    command = wall([script, "compile", str(BASELINE), "--json"])
    torch_import = wall([sys.executable, "-c", "import torch"])
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
