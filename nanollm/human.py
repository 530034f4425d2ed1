"""Figures and tables for people."""
from __future__ import annotations

import sys

from rich.console import Console


def console() -> Console:
    """The rich console of every command: pipes get full-width tables, not ellipses."""
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def human(number: float, unit: str = "") -> str:
    """A figure for people: 1234567 -> '1.23M'; past tera, scientific notation (1.00e+20)."""
    if abs(number) >= 1e15:
        return f"{number:.2e}{unit}"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= scale:
            return f"{number / scale:.2f}{suffix}{unit}"
    return f"{number:g}{unit}"
