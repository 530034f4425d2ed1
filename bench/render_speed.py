"""How long `nanollm render` adds to the analysis it draws from, for every shipped file.

Run: python bench/render_speed.py. Timings are medians over a few runs, in one process; each drawing is
shown next to the compile and analysis of the same file (FLOP counts afresh), since this machine is shared
and its absolute speed varies.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

import nanollm
import nanollm.analysis
from nanollm.render import Subject, html, network, svg
from nanollm.render.text import dot, mermaid

ROOT = Path(__file__).resolve().parent.parent
RUNS = 3
DRAWINGS: dict[str, Callable[[Subject, str], str]] = {
    "svg": svg,
    "html": html,
    "mmd": lambda subject, view: mermaid(network(subject, view)),
    "dot": lambda subject, view: dot(network(subject, view)),
}


def median_time(work: Callable[[], object]) -> float:
    """Median seconds of a call."""
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def analysed(path: Path) -> nanollm.Compiled:
    """Compile and analyse afresh (no FLOP counts kept from an earlier run)."""
    nanollm.analysis._MACS.clear()
    compiled = nanollm.compile(path)
    compiled.analysis
    return compiled


def main() -> None:
    analysed(ROOT / "archs" / "qwen3_0_6b.arch")  # one-time imports out of the way
    table = Table(title="render time next to compile + analysis (medians, ms)", title_justify="left")
    for name in ("file", "compile + analysis", *(f"{view} .{fmt}" for view in ("stack", "graph") for fmt in DRAWINGS), "slowest drawing / analysis"):
        table.add_column(name, justify="left" if name == "file" else "right")
    for path in sorted((ROOT / "archs").glob("*.arch")):
        analysis_time = median_time(lambda: analysed(path))
        compiled = analysed(path)
        subject = Subject(path.name, compiled.arch, compiled.graph, compiled.analysis)
        drawings = [median_time(lambda: draw(subject, view)) for view in ("stack", "graph") for draw in DRAWINGS.values()]
        cells = [f"{1000 * t:.1f}" for t in (analysis_time, *drawings)]
        table.add_row(path.name, *cells, f"{max(drawings) / analysis_time:.2f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
