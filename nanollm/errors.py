"""Errors in .arch sources, reported as `file:line:col: message` with the line and a caret."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Source:
    """An .arch text and the name it is reported under (a path, or <text>)."""

    name: str
    text: str


@dataclass(frozen=True)
class Pos:
    """A span in a source: 1-based line and column, and its width in characters."""

    source: Source
    line: int
    col: int
    width: int = 1


class ArchError(Exception):
    """A problem in an .arch source or in compile arguments, tied to the place it was written."""

    def __init__(self, message: str, pos: Pos | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.pos, self.hint = message, pos, hint

    def __str__(self) -> str:
        if self.pos is None:
            return self.message + (f"\n  {self.hint}" if self.hint else "")
        p = self.pos
        lines = p.source.text.splitlines() or [""]
        text = lines[p.line - 1] if p.line <= len(lines) else ""
        report = [f"{p.source.name}:{p.line}:{p.col}: {self.message}", f"  {text}", "  " + " " * (p.col - 1) + "^" * max(1, p.width)]
        if self.hint:
            report.append(f"  {self.hint}")
        return "\n".join(report)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A 'did you mean' hint for a misspelt name, or None if nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
