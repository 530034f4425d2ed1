"""The `nanollm` command line: compile (and size to a budget), compare, train, eval, render, graph, fmt."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from rich.table import Table

from .analysis import Analysis
from .budget import Solution, solve, validate
from .compiled import compile
from .components import SLOTS, brief
from .errors import NanollmError
from .human import console, human
from .ir import Arch, ModelConfig
from .render import VIEWS, Subject, check_output, write
from .resolve import read
from .syntax import format_file


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exit code 2."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_number(text: str) -> float:
    """argparse type: a number > 0 such as 1e20."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 1e20, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


BUDGET_OPTIONS = ("law", "tokens", "params", "devices")
BUDGET_ONLY = (*BUDGET_OPTIONS, "output")
FIGURE_COLUMNS = ("params", "active", "FLOPs/token", "cache bytes/token")
STATE_COLUMN = "state bytes"  # shown only for models with a recurrent state


def require_budget(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """An error naming the budget options given without --budget."""
    given = [f"--{name}" if name != "output" else "-o" for name in names if getattr(args, name) is not None]
    if given:
        raise NanollmError(f"{', '.join(given)} needs --budget")


def layer_columns(arch: Arch, analysis: Analysis) -> tuple[str, ...]:
    """The per-layer table's columns: the slots the model uses, its residual schemes if they vary, the figures (the
    recurrent state per sequence if any layer keeps one)."""
    slots = [slot for slot in SLOTS if any(layer.get(slot) for layer in arch.layers)]
    varied = len({layer.residual for layer in arch.layers}) > 1
    return ("layer", *slots, *(("residual",) if varied else ()), *FIGURE_COLUMNS, *((STATE_COLUMN,) if analysis.state_bytes else ()))


def layer_rows(arch: Arch, analysis: Analysis) -> list[tuple[str, ...]]:
    """A row per layer, under `layer_columns`."""
    columns, config = layer_columns(arch, analysis), arch.config
    rows = []
    for r, layer in zip(analysis.layers, arch.layers):
        calls = [brief(layer.get(slot), config) if layer.get(slot) else "-" for slot in SLOTS if slot in columns]
        residual = [brief(layer.residual, config)] if "residual" in columns else []
        state = [human(r.state_bytes)] if STATE_COLUMN in columns else []
        rows.append((str(r.index), *calls, *residual, human(r.params), human(r.params_active), human(r.flops_per_token_fwd),
                     human(r.cache_bytes_per_token), *state))
    return rows


def total_rows(arch: Arch, analysis: Analysis) -> list[tuple[str, str]]:
    """The whole model's figures: (name, value)."""
    return [
        ("residual, norm", f"{brief(arch.config.residual, arch.config)}, {brief(arch.config.norm, arch.config)}"),
        ("parameters", human(analysis.params_total)),
        ("active per token", human(analysis.params_active)),
        ("embedding", human(analysis.params_embedding)),
        ("forward FLOPs/token", human(analysis.flops_per_token_fwd)),
        ("training FLOPs/token (3x)", human(analysis.flops_per_token_train)),
        ("inference cache/token", human(analysis.cache_bytes_per_token, "B")),
        *([("of which recurrent state/sequence", human(analysis.state_bytes, "B"))] if analysis.state_bytes else []),
        ("activations saved (batch 1)", human(analysis.activation_bytes, "B")),
    ]


def cmd_compile(args: argparse.Namespace) -> None:
    if args.budget is not None:
        return cmd_budget(args)
    require_budget(args, BUDGET_ONLY)
    compiled = compile(Path(args.file))
    analysis = compiled.analyze(args.seq_len or compiled.config.seq_len)
    if args.json:
        print(json.dumps(analysis.to_json(), indent=2))
        return
    table = Table(title=f"{args.file}  (seq_len {analysis.seq_len}, batch 1)", title_justify="left")
    for name in layer_columns(compiled.arch, analysis):
        table.add_column(name, justify="right" if name in (*FIGURE_COLUMNS, STATE_COLUMN, "layer") else "left")
    for row in layer_rows(compiled.arch, analysis):
        table.add_row(*row)
    totals = Table(show_header=False, box=None)
    totals.add_column(justify="left")
    totals.add_column(justify="right")
    for name, value in total_rows(compiled.arch, analysis):
        totals.add_row(name, value)
    out = console()
    out.print(table)
    out.print(totals)


def solve_file(args: argparse.Namespace, path: str) -> Solution:
    """Size one file to the command's budget."""
    tokens = None if args.tokens is None else round(args.tokens)
    params = None if args.params is None else round(args.params)
    return solve(Path(path), args.budget, law=args.law, tokens=tokens, params=params, seq_len=args.seq_len)


def budget_rows(solution: Solution, devices: int) -> list[tuple[str, float, str]]:
    """(label, value, unit) for every figure a sized model is judged by."""
    a, config = solution.analysis, solution.arch.config
    single = solution.memory(1)
    rows = [
        ("d_model", config.d_model, "n"),
        ("layers", config.n_layers, "n"),
        ("heads / kv heads", config.n_heads, f"/{config.n_kv_heads}"),
        ("d_ff", config.d_ff, "n"),
        ("parameters", a.params_total, ""),
        ("active parameters", a.params_active, ""),
        ("non-embedding parameters", solution.params_non_embedding, ""),
        ("tokens", solution.tokens, ""),
        ("tokens per active parameter", solution.tokens / a.params_active, "ratio"),
        ("training FLOPs/token", a.flops_per_token_train, ""),
        ("training compute", solution.train_flops, ""),
        ("compute vs budget", solution.train_flops / solution.budget - 1, "percent"),
        ("inference cache/token", a.cache_bytes_per_token, "B"),
        ("weights + grads + AdamW state", single.state, "B"),
        ("activations and logits (one sequence)", single.activations + single.logits, "B"),
        ("training memory, 1 device", single.total, "B"),
    ]
    if devices > 1:
        rows.append((f"training memory/device, FSDP over {devices}", solution.memory(devices).total, "B"))
    return rows


def show(value: float, unit: str) -> str:
    """A figure for a table cell."""
    if unit == "n":
        return str(int(value))
    if unit.startswith("/"):
        return f"{int(value)}{unit}"
    if unit == "ratio":
        return f"{value:.1f}"
    if unit == "percent":
        return f"{value * 100:+.4f}%"
    return human(value, unit)


def cmd_budget(args: argparse.Namespace) -> None:
    solution, devices = solve_file(args, args.file), args.devices or 1
    if args.output:
        Path(args.output).write_text(solution.text, encoding="utf-8")
    if args.json:
        print(json.dumps(solution.to_json(devices), indent=2))
        return
    table = Table(title=f"{args.file} sized to {args.budget:.3g} FLOPs ({solution.law}, seq_len {solution.analysis.seq_len})", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for label, value, unit in budget_rows(solution, devices):
        table.add_row(label, show(value, unit))
    console().print(table)


def cmd_compare(args: argparse.Namespace) -> None:
    solutions, devices = [solve_file(args, path) for path in args.files], args.devices or 1
    if args.json:
        print(json.dumps([{"file": path, **s.to_json(devices)} for path, s in zip(args.files, solutions)], indent=2))
        return
    table = Table(title=f"sized to {args.budget:.3g} FLOPs ({solutions[0].law}); ratios to the first column", title_justify="left")
    table.add_column("figure")
    for path in args.files:
        table.add_column(Path(path).name, justify="right")
    rows = [budget_rows(s, devices) for s in solutions]
    for i, (label, first, unit) in enumerate(rows[0]):
        cells = [show(first, unit)]
        for other in rows[1:]:
            value = other[i][1]
            ratio = f" (x{value / first:.2f})" if first and unit not in ("percent", "/") else ""
            cells.append(show(value, other[i][2]) + ratio)
        table.add_row(label, *cells)
    console().print(table)


def cmd_render(args: argparse.Namespace) -> None:
    check_output(Path(args.output))  # before the work, so a wrong suffix fails at once
    if args.budget is None:
        require_budget(args, BUDGET_OPTIONS)
        compiled = compile(Path(args.file))
        arch, graph, analysis = compiled.arch, compiled.graph, compiled.analyze(args.seq_len or compiled.config.seq_len)
        notes, tables = (), ()
    else:
        solution = solve_file(args, args.file)
        arch, graph, analysis = solution.arch, solution.graph, solution.analysis
        notes = (f"sized to {args.budget:.3g} training FLOPs ({solution.law}): {human(solution.tokens)} tokens",)
        tables = (("budget", ("figure", "value"), [(label, show(value, unit)) for label, value, unit in budget_rows(solution, args.devices or 1)]),)
    tables = (("layers", layer_columns(arch, analysis), layer_rows(arch, analysis)), ("totals", ("figure", "value"), total_rows(arch, analysis)), *tables)
    write(Path(args.output), Subject(Path(args.file).name, arch, graph, analysis, notes, tables), args.view)


def cmd_import(args: argparse.Namespace) -> None:
    from .hf import arch_from_config, load_config  # transformers is imported only here
    from .source import arch_source

    hf = load_config(args.source)
    text = arch_source(arch_from_config(hf), f"{hf.model_type} from {args.source}, written by `nanollm import`")
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as error:
            raise NanollmError(f"cannot write {args.output}: {error.strerror or error}") from None
    else:
        sys.stdout.write(text)


def cmd_graph(args: argparse.Namespace) -> None:
    print(compile(Path(args.file)).graph.graph)


def cmd_fmt(args: argparse.Namespace) -> None:
    parsed = read(Path(args.file))
    validate(parsed)  # only well-formed models are formatted
    text = format_file(parsed, ModelConfig.setting_names())
    if args.write:
        Path(args.file).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def cmd_train(args: argparse.Namespace) -> int | None:
    from .train.recipe import KEYS
    from .train.trainer import PREEMPTED_EXIT_CODE, Preempted, train

    overrides = {name: getattr(args, name) for name in KEYS if getattr(args, name, None) is not None}
    out = Path(args.out) if args.out else None
    try:
        train(Path(args.file), args.recipe, overrides, out, Path(args.resume) if args.resume else None)
    except Preempted:  # the trainer has said where the checkpoint is and how to continue
        return PREEMPTED_EXIT_CODE
    return None


def cmd_eval(args: argparse.Namespace) -> None:
    from .train.trainer import evaluate_run

    result = evaluate_run(Path(args.path), args.eval_tokens)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"held-out evaluation of {result['checkpoint']} (step {result['step']})", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value in (("held-out set", result["fingerprint"]), ("tokens", f"{result['tokens']:,}"), ("sequences", f"{result['sequences']:,}"),
                         ("bytes", f"{result['bytes']:,}"), ("loss (nats/token)", f"{result['loss']:.4f} ± {result['loss_stderr']:.4f}"),
                         ("perplexity", f"{result['perplexity']:.3f}"), ("bits per byte", f"{result['bits_per_byte']:.4f}")):
        table.add_row(label, value)
    out = console()
    out.print(table)
    if result["run_fingerprint"] != result["fingerprint"]:
        scored = f"set {result['run_fingerprint']}" if result["run_fingerprint"] else "an older set (chosen before sets had fingerprints)"
        out.print(f"note: the run's own evaluations at step {result['step']} scored {scored}: these figures do not compare with its metrics.jsonl")


def recipe_flag_type(name: str):
    """argparse type for one recipe key: YAML-style text checked against the key's type."""
    from .train.recipe import parse_value

    def convert(text: str):
        try:
            return parse_value(name, text)
        except NanollmError as error:
            raise argparse.ArgumentTypeError(error.message.removeprefix(f"command line: {name} ")) from None

    return convert


def add_train_commands(commands: argparse._SubParsersAction) -> None:
    """`nanollm train` (every recipe key is also a flag) and `nanollm eval`."""
    from .train.recipe import KEYS

    train_cmd = commands.add_parser("train", help="train a model: embedded CPU default, or a recipe with overrides")
    train_cmd.add_argument("file", help="the .arch file of the model")
    train_cmd.add_argument("--recipe", help="a training recipe (YAML), e.g. runtime/train/pretrain_muon.yaml")
    train_cmd.add_argument("--out", help="the run directory (default: runs/<arch>-<time>)")
    train_cmd.add_argument("--resume", help="continue the run in this directory from its latest checkpoint")
    for name, field in KEYS.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.metadata["doc"]
        if field.type.startswith("bool"):
            train_cmd.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            train_cmd.add_argument(flag, dest=name, type=recipe_flag_type(name), metavar=name.upper(), help=help_text)
    train_cmd.set_defaults(run=cmd_train)
    eval_cmd = commands.add_parser("eval", help="held-out perplexity and bits per byte of a run or checkpoint")
    eval_cmd.add_argument("path", help="a run directory (its latest checkpoint) or a checkpoint folder")
    eval_cmd.add_argument("--eval-tokens", type=positive_int, help="held-out tokens to score (default: the run's eval_tokens)")
    eval_cmd.add_argument("--json", action="store_true", help="print one JSON object")
    eval_cmd.set_defaults(run=cmd_eval)


def add_budget_options(parser: argparse.ArgumentParser, required: bool) -> None:
    """--budget and the options that shape how it is spent."""
    parser.add_argument("--budget", type=positive_number, required=required, help="training compute in FLOPs, e.g. 1e20")
    parser.add_argument("--law", help="chinchilla (default), chinchilla-paper, deepseek, or tokens-per-param=R")
    pinned = parser.add_mutually_exclusive_group()
    pinned.add_argument("--tokens", type=positive_number, help="pin the token count; the budget sets the size")
    pinned.add_argument("--params", type=positive_number, help="pin the (active) parameter count; the budget sets the tokens")
    parser.add_argument("--devices", type=positive_int, help="devices to shard training memory over with FSDP (default 1)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nanollm` console script."""
    parser = _Parser(prog="nanollm", description="Declarative LLM architecture compiler.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    compile_cmd = commands.add_parser("compile", help="analyse an .arch file: parameters, FLOPs, inference cache")
    compile_cmd.add_argument("file")
    compile_cmd.add_argument("--seq-len", type=positive_int, help="sequence length for the analysis (default: the file's seq_len)")
    compile_cmd.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    add_budget_options(compile_cmd, required=False)
    compile_cmd.add_argument("-o", "--output", help="with --budget: write the sized model as a concrete .arch file")
    compile_cmd.set_defaults(run=cmd_compile)
    compare_cmd = commands.add_parser("compare", help="size several .arch files to one budget, side by side")
    compare_cmd.add_argument("files", nargs="+")
    compare_cmd.add_argument("--seq-len", type=positive_int, help="sequence length (default: each file's seq_len)")
    compare_cmd.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    add_budget_options(compare_cmd, required=True)
    compare_cmd.set_defaults(run=cmd_compare)
    import_cmd = commands.add_parser("import", help="write the .arch file of a transformers model from its config alone (no weights)")
    import_cmd.add_argument("source", help="a model directory or its config.json")
    import_cmd.add_argument("-o", "--output", help="the .arch file to write (default: print it)")
    import_cmd.set_defaults(run=cmd_import)
    graph_cmd = commands.add_parser("graph", help="print the torch.fx graph")
    graph_cmd.add_argument("file")
    graph_cmd.set_defaults(run=cmd_graph)
    fmt_cmd = commands.add_parser("fmt", help="print the canonical form of an .arch file")
    fmt_cmd.add_argument("file")
    fmt_cmd.add_argument("-w", "--write", action="store_true", help="rewrite the file in place")
    fmt_cmd.set_defaults(run=cmd_fmt)
    render_cmd = commands.add_parser("render", help="draw the architecture: .svg, .html, .mmd (Mermaid), .dot, .png/.pdf (Graphviz)")
    render_cmd.add_argument("file")
    render_cmd.add_argument("-o", "--output", required=True, help="the file to write; its suffix picks the format")
    render_cmd.add_argument("--view", choices=VIEWS, default="stack", help="stack: the layer stack as a block diagram (default); graph: the fx graph with shapes")
    render_cmd.add_argument("--seq-len", type=positive_int, help="sequence length of the figures and shapes (default: the file's seq_len)")
    add_budget_options(render_cmd, required=False)
    render_cmd.set_defaults(run=cmd_render)
    add_train_commands(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0  # a command returns an exit code only when it is not 0
    except NanollmError as error:
        sys.stderr.write(f"{error}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
