"""Errors a user can act on: one line (plus a hint), never a traceback; the CLI prints them and exits with code 2.

`NanollmError` is the base. `ArchError` is a problem with a model description; when it comes from .arch
source it carries the position and is reported as `file:line:col: message` with the line and a caret.
The others name where the problem lies: a training recipe, the data, a launch, a run directory, a drawing.
"""
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


class NanollmError(Exception):
    """A problem in what the user asked for, told in one line and an optional hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint

    def __str__(self) -> str:
        return self.message + (f"\n  {self.hint}" if self.hint else "")


class ArchError(NanollmError):
    """A problem in a model description: .arch source (with its position), compile arguments, or a transformers config."""

    def __init__(self, message: str, pos: Pos | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.pos = pos

    def __str__(self) -> str:
        if self.pos is None:
            return super().__str__()
        p = self.pos
        lines = p.source.text.splitlines() or [""]
        text = lines[p.line - 1] if p.line <= len(lines) else ""
        report = [f"{p.source.name}:{p.line}:{p.col}: {self.message}", f"  {text}", "  " + " " * (p.col - 1) + "^" * max(1, p.width)]
        if self.hint:
            report.append(f"  {self.hint}")
        return "\n".join(report)


class RecipeError(NanollmError):
    """A training recipe or command-line setting that is unknown, mistyped or contradictory."""


class DataError(NanollmError):
    """Training data or a tokenizer that cannot be used."""


class LaunchError(NanollmError):
    """Processes or devices that do not fit the run: a launch that started too few, a model that does not fit."""


class RunError(NanollmError):
    """A run directory or checkpoint that cannot be started, resumed or evaluated as asked."""


class RenderError(NanollmError):
    """A diagram that cannot be written: an unknown format, a missing or failing Graphviz."""


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A 'did you mean' hint for a misspelt name, or None if nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
