"""The `nanollm` command line: compile, graph, fmt."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .components import REGISTRY
from .errors import ArchError
from .ir import Call, ModelConfig


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exit code 2."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def human(number: float, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= scale:
            return f"{number / scale:.2f}{suffix}{unit}"
    return f"{number:g}{unit}"


def brief(call: Call, config: ModelConfig) -> str:
    """A call without the arguments left at their defaults (`moe(experts=16)`); carried ones always show."""
    return call.brief({p.name: p.default_for(config) for p in REGISTRY[call.name].params if not p.carry})


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_compile(args: argparse.Namespace) -> None:
    from . import compile

    compiled = compile(Path(args.file))
    analysis = compiled.analyze(args.seq_len or compiled.config.seq_len)
    if args.json:
        print(json.dumps(analysis.to_json(), indent=2))
        return
    table = Table(title=f"{args.file}  (seq_len {analysis.seq_len}, batch 1)", title_justify="left")
    for name in ("layer", "mixer", "ffn", "params", "active", "FLOPs/token", "KV bytes/token"):
        table.add_column(name, justify="left" if name in ("mixer", "ffn") else "right")
    for r, layer in zip(analysis.layers, compiled.arch.layers):
        mixer, ffn = (brief(call, compiled.config) for call in (layer.mixer, layer.ffn))
        table.add_row(str(r.index), mixer, ffn, human(r.params), human(r.params_active), human(r.flops_per_token_fwd), human(r.kv_cache_bytes_per_token))
    totals = Table(show_header=False, box=None)
    totals.add_column(justify="left")
    totals.add_column(justify="right")
    for name, value in (
        ("parameters", human(analysis.params_total)),
        ("active per token", human(analysis.params_active)),
        ("embedding", human(analysis.params_embedding)),
        ("forward FLOPs/token", human(analysis.flops_per_token_fwd)),
        ("training FLOPs/token (3x)", human(analysis.flops_per_token_train)),
        ("KV cache/token", human(analysis.kv_cache_bytes_per_token, "B")),
        ("activations saved (batch 1)", human(analysis.activation_bytes, "B")),
    ):
        totals.add_row(name, value)
    console = Console(width=None if sys.stdout.isatty() else 160)  # pipes get full call names, not ellipses
    console.print(table)
    console.print(totals)


def cmd_graph(args: argparse.Namespace) -> None:
    from . import compile

    print(compile(Path(args.file)).graph.graph)


def cmd_fmt(args: argparse.Namespace) -> None:
    from .resolve import read, resolve
    from .syntax import format_file

    parsed = read(Path(args.file))
    resolve(parsed)  # only well-formed models are formatted
    text = format_file(parsed, ModelConfig.setting_names())
    if args.write:
        Path(args.file).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nanollm` console script."""
    parser = _Parser(prog="nanollm", description="Declarative LLM architecture compiler.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    compile_cmd = commands.add_parser("compile", help="analyse an .arch file: parameters, FLOPs, KV cache")
    compile_cmd.add_argument("file")
    compile_cmd.add_argument("--seq-len", type=positive_int, help="sequence length for the analysis (default: the file's seq_len)")
    compile_cmd.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    compile_cmd.set_defaults(run=cmd_compile)
    graph_cmd = commands.add_parser("graph", help="print the torch.fx graph")
    graph_cmd.add_argument("file")
    graph_cmd.set_defaults(run=cmd_graph)
    fmt_cmd = commands.add_parser("fmt", help="print the canonical form of an .arch file")
    fmt_cmd.add_argument("file")
    fmt_cmd.add_argument("-w", "--write", action="store_true", help="rewrite the file in place")
    fmt_cmd.set_defaults(run=cmd_fmt)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ArchError as error:
        sys.stderr.write(f"{error}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
