"""Architecture diagrams (`nanollm render`), drawn from the compiled IR and its analysis.

Two views: "stack", the layer stack as a paper-style block diagram (stack.py, svg.py), and "graph", the fx
graph itself with every node's output shape (graph.py). The output file's suffix picks the format: .svg
and .html are written by nanollm itself, .mmd is Mermaid and .dot is Graphviz (text.py); .png and .pdf are
the DOT laid out by Graphviz's `dot` program, which must be installed for them.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from html import escape
from pathlib import Path

from torch import fx

from ..analysis import Analysis
from ..errors import RenderError
from ..ir import Arch
from .graph import graph_network
from .stack import stack, stack_network
from .svg import network_svg, stack_svg
from .text import Network, dot, mermaid

VIEWS = ("stack", "graph")
SUFFIXES = (".svg", ".html", ".mmd", ".dot", ".png", ".pdf")
Table = tuple[str, tuple[str, ...], list[tuple[str, ...]]]  # caption, header, rows


@dataclass(frozen=True)
class Subject:
    """What a diagram is drawn from: a compiled model's IR, graph and analysis, and words to title it."""

    name: str
    arch: Arch
    graph: fx.GraphModule
    analysis: Analysis
    notes: tuple[str, ...] = ()  # more title lines, e.g. the budget the model was sized to
    tables: tuple[Table, ...] = ()  # shown under the diagram on the .html page


def network(subject: Subject, view: str) -> Network:
    """The view as a network, for the text formats."""
    if view == "graph":
        return graph_network(subject.graph, subject.analysis.seq_len)
    return stack_network(subject.arch, subject.analysis, stack(subject.arch))


def svg(subject: Subject, view: str) -> str:
    """The view as a standalone SVG document."""
    if view == "graph":
        note = f"the fx graph; output shapes for one sequence of {subject.analysis.seq_len} tokens (batch 1)"
        return network_svg(network(subject, view), subject.name, [note, *subject.notes])
    return stack_svg(subject.name, list(subject.notes), subject.arch, subject.analysis, stack(subject.arch))


def html(subject: Subject, view: str) -> str:
    """One self-contained page: the SVG, then the tables."""
    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
        f"<title>{escape(subject.name)}</title>",
        "<style>body{font-family:'DejaVu Sans',Verdana,Helvetica,Arial,sans-serif;color:#222;margin:24px}"
        "table{border-collapse:collapse;margin:8px 0 28px}caption{text-align:left;font-weight:bold;padding:4px 0}"
        "th,td{padding:3px 12px;border-bottom:1px solid #e3e3e3;font-size:13px;text-align:left}"
        "td.number{text-align:right;font-variant-numeric:tabular-nums}</style>\n</head>\n<body>",
        svg(subject, view),
    ]
    for caption, header, rows in subject.tables:
        parts.append(f"<table>\n<caption>{escape(caption)}</caption>")
        parts.append("<tr>" + "".join(f"<th>{escape(cell)}</th>" for cell in header) + "</tr>")
        for row in rows:
            cells = "".join(f'<td{" class=number" if cell[:1].isdigit() or cell[:1] in "+-" else ""}>{escape(cell)}</td>' for cell in row)
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</table>")
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


def check_output(path: Path) -> None:
    """An error unless nanollm can write this file: a known suffix, and Graphviz's `dot` for .png and .pdf."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise RenderError(f"cannot tell the format of '{path}': use a file ending in {', '.join(SUFFIXES)}")
    if suffix in (".png", ".pdf") and shutil.which("dot") is None:
        raise RenderError(f"{suffix} needs Graphviz's `dot` program, which is not installed (.svg, .html, .mmd and .dot need nothing)")


def write(path: Path, subject: Subject, view: str = "stack") -> None:
    """Draw the view into `path`, in the format its suffix names."""
    check_output(path)
    if view not in VIEWS:
        raise RenderError(f"unknown view '{view}': use {' or '.join(VIEWS)}")
    suffix = path.suffix.lower()
    if suffix in (".png", ".pdf"):
        command = [shutil.which("dot") or "dot", f"-T{suffix[1:]}", "-o", str(path)]
        done = subprocess.run(command, input=dot(network(subject, view)).encode(), capture_output=True)
        if done.returncode:
            message = done.stderr.decode(errors="replace").strip().splitlines() or [f"exit code {done.returncode}"]
            raise RenderError(f"Graphviz's dot failed: {message[-1]}")
        return
    if suffix == ".svg":
        content = svg(subject, view)
    elif suffix == ".html":
        content = html(subject, view)
    else:
        content = (dot if suffix == ".dot" else mermaid)(network(subject, view))
    try:
        path.write_text(content, encoding="utf-8")
    except OSError as error:
        raise RenderError(f"cannot write {path}: {error.strerror or error}") from None
