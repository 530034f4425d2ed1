"""How long budget sizing takes: one solve per shipped file, and a sweep of ten budgets.

Run: python bench/budget_speed.py. A solve searches the width grid with exact analyses of depth-1 models
and ends with the exact analysis of the final graph; a sweep reuses what earlier solves measured. The
one-time imports (torch._dynamo, first used by meta-device analysis) are paid before timing.
"""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import nanollm
import nanollm.analysis
import nanollm.budget

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = [10.0**e for e in range(15, 25)]


def fresh() -> None:
    """Forget every cached count, as a new process would."""
    nanollm.analysis._MACS.clear()
    nanollm.budget._FIGURES.clear()


def main() -> None:
    nanollm.compile("global").analyze(64)  # one-time imports out of the way
    table = Table(title="budget sizing speed (seconds, in process)", title_justify="left")
    for name in ("file", "solve at 1e21", "at 1e24", "sweep 1e15..1e24 (10 budgets)", "per budget in the sweep"):
        table.add_column(name, justify="left" if name == "file" else "right")
    for path in sorted((ROOT / "archs").glob("*.arch")):
        times = []
        for budget in (1e21, 1e24):
            fresh()
            start = time.perf_counter()
            nanollm.budget.solve(path, budget)
            times.append(time.perf_counter() - start)
        fresh()
        start = time.perf_counter()
        for budget in BUDGETS:
            nanollm.budget.solve(path, budget)
        sweep = time.perf_counter() - start
        table.add_row(path.name, f"{times[0]:.2f}", f"{times[1]:.2f}", f"{sweep:.2f}", f"{sweep / len(BUDGETS):.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
