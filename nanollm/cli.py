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


def token_count(text: str) -> int:
    """argparse type: a token count >= 1, optionally with k (x1024) or m (x1024^2): 4096, 32k, 1m."""
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:].lower(), 1)
    value = positive_int(text[:-1] if scale > 1 else text)
    if value * scale > 1 << 24:
        raise argparse.ArgumentTypeError(f"at most 16m tokens, got {text}")
    return value * scale


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
        *([("lookup memory (tables)", human(analysis.params_memory))] if analysis.params_memory else []),
        ("forward FLOPs/token", human(analysis.flops_per_token_fwd)),
        ("training FLOPs/token (3x)", human(analysis.flops_per_token_train)),
        ("inference cache/token", human(analysis.cache_bytes_per_token, "B")),
        *([("recurrent state/sequence", human(analysis.state_bytes, "B"))] if analysis.state_bytes else []),
        ("activations saved (batch 1)", human(analysis.activation_bytes, "B")),
    ]


def cmd_compile(args: argparse.Namespace) -> None:
    if args.budget is not None:
        return cmd_budget(args)
    require_budget(args, BUDGET_ONLY)
    compiled = compile(Path(args.file))
    compiled.stored = True
    analysis = compiled.analyze(args.seq_len or compiled.config.seq_len)
    inference = compiled.inference(args.context) if args.context else None
    if args.json:
        print(json.dumps({**analysis.to_json(), **({"inference": inference.to_json()} if inference else {})}, indent=2))
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
    if inference:
        at = f"at context {inference.context:,}"
        for name, value in ((f"prefill FLOPs {at}", human(inference.prefill_flops)), (f"decode FLOPs/token {at}", human(inference.decode_flops_per_token)),
                            (f"inference cache {at}", human(inference.cache_bytes, "B"))):
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


def cmd_lm_eval(args: argparse.Namespace) -> None:
    from .harness import run_lm_eval

    if not args.tasks:
        raise NanollmError("--harness lm-eval needs --tasks NAMES")
    results, file = run_lm_eval(args.path, args.tasks.split(","), args.include, args.limit)
    if args.json:
        print(json.dumps(results["results"], indent=2, default=str))
        return
    table = Table(title=f"lm-eval on {results['model']}", title_justify="left")
    for column in ("task", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and "stderr" not in key:
                table.add_row(task, key.split(",")[0], f"{value:.4f}")
    console().print(table)
    console().print(f"scores written to {file}")


def cmd_eval(args: argparse.Namespace) -> None:
    if args.harness == "lm-eval":
        return cmd_lm_eval(args)
    if args.include or args.limit:
        raise NanollmError("--include and --limit need --harness lm-eval")
    from .train.tasks import parse_tasks
    from .train.trainer import evaluate_run

    result = evaluate_run(Path(args.path), args.eval_tokens, parse_tasks(args.tasks) if args.tasks else ())
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
    for name, value in result["tasks"].items():
        table.add_row(f"{name} accuracy", f"{value:.3f}")
    out = console()
    out.print(table)
    if result["run_fingerprint"] != result["fingerprint"]:
        scored = f"set {result['run_fingerprint']}" if result["run_fingerprint"] else "an older set (chosen before sets had fingerprints)"
        out.print(f"note: the run's own evaluations at step {result['step']} scored {scored}: these figures do not compare with its metrics.jsonl")


def cmd_consolidate(args: argparse.Namespace) -> None:
    from .train.checkpoint import consolidate_checkpoint

    checkpoint, out = consolidate_checkpoint(Path(args.path), Path(args.out) if args.out else None)
    console().print(f"{checkpoint}: model -> {out} ({out.stat().st_size:,} bytes)")


def cmd_tokenize(args: argparse.Namespace) -> None:
    from .train.tokenizer import load_tokenizer
    from .train.tokens import tokenize_corpus

    out = console()
    tokenizer = load_tokenizer(args.tokenizer)
    with out.status("tokenising") as status:
        manifest = tokenize_corpus(args.data, Path(args.out), tokenizer, args.tokenizer, args.data_config, args.data_split, args.text_field,
                                   args.eval_share, report=lambda read: status.update(f"tokenising: {read:,} documents read"))
    out.print(f"{manifest['source']['name']} -> {args.out}: {manifest['tokens']['train']:,} training tokens in {manifest['documents']['train']:,} "
              f"documents, {manifest['tokens']['heldout']:,} held-out tokens in {manifest['documents']['heldout']:,} (eval_share "
              f"{manifest['eval_share']}); tokenizer {manifest['tokenizer']}. Train from it with --data {args.out}")


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of `generate`: --prompt, or one per non-empty line of --prompts FILE."""
    if args.prompts is None:
        return [args.prompt]
    try:
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise NanollmError(f"cannot read {args.prompts}: {error.strerror or error}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise NanollmError(f"{args.prompts}: no prompt in it (one a line)")
    return prompts


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from .decode import Decoder, Sampling, stream_text
    from .trained import load_trained

    prompts = read_prompts(args)
    trained = load_trained(args.path)
    decoder = Decoder(trained.model, trained.arch, trained.context, compiled=args.compile)
    sampling = Sampling(args.temperature, args.top_k or 0, args.top_p)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([trained.tokenizer.encode(prompt)], dtype=torch.long)
        decoder.check(ids)
        if len(prompts) > 1:
            sys.stdout.write(f"{'' if i == 0 else chr(10)}--- prompt {i + 1}\n")
        sys.stdout.write(prompt)
        for piece in stream_text(decoder, trained.tokenizer, ids, args.max_new_tokens, sampling, args.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def cmd_export(args: argparse.Namespace) -> None:
    from .hf.export import export
    from .trained import load_trained

    target = Path(args.output)
    if target.exists():  # before loading anything
        raise NanollmError(f"{target} exists: export writes a new directory")
    trained = load_trained(args.path)
    config = export(trained.model, trained.arch, trained.tokenizer, target)
    how = "trust_remote_code=True, nanollm installed" if config.model_type == "nanollm" else "no custom code"
    print(f"wrote {target}: {config.architectures[0]} ({config.model_type}), loadable with AutoModelForCausalLM.from_pretrained ({how})")


def cmd_sweep(args: argparse.Namespace) -> int | None:
    from .sweep.run import Interrupted, sweep
    from .train.recipe import KEYS
    from .train.trainer import PREEMPTED_EXIT_CODE

    overrides = {name: getattr(args, name) for name in KEYS if getattr(args, name, None) is not None}
    law = f"tokens-per-param={args.tokens_per_param:g}" if args.tokens_per_param else args.law
    try:
        sweep(args.files, args.budgets, Path(args.out), seeds=args.seeds, sizes=args.sizes, law=law, recipe=Path(args.recipe) if args.recipe else None,
              overrides=overrides, tasks=args.tasks, jobs=args.jobs, plan_only=args.plan_only)
    except Interrupted:  # the runs have checkpointed: the same command continues them
        return PREEMPTED_EXIT_CODE
    return None


def recipe_flag_type(name: str):
    """argparse type for one recipe key: YAML-style text checked against the key's type."""
    from .train.recipe import parse_value

    def convert(text: str):
        try:
            return parse_value(name, text)
        except NanollmError as error:
            raise argparse.ArgumentTypeError(error.message.removeprefix(f"command line: {name} ")) from None

    return convert


def add_recipe_flags(parser: argparse.ArgumentParser, leave_out: tuple[str, ...] = ()) -> None:
    """Every recipe key as a flag (`--lr 1e-3`, `--no-compile`), but those left out."""
    from .train.recipe import KEYS

    for name, field in KEYS.items():
        if name in leave_out:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = field.metadata["doc"]
        if field.type.startswith("bool"):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=recipe_flag_type(name), metavar=name.upper(), help=help_text)


def add_train_commands(commands: argparse._SubParsersAction) -> None:
    """`nanollm train` (every recipe key is also a flag), `eval`, `consolidate`, `tokenize` and `sweep`."""
    from .train.recipe import KEYS

    train_cmd = commands.add_parser("train", help="train a model: embedded CPU default, or a recipe with overrides")
    train_cmd.add_argument("file", help="the .arch file of the model")
    train_cmd.add_argument("--recipe", help="a training recipe (YAML), e.g. runtime/train/pretrain_muon.yaml")
    train_cmd.add_argument("--out", help="the run directory (default: runs/<arch>-<time>)")
    train_cmd.add_argument("--resume", help="continue the run in this directory from its latest checkpoint")
    add_recipe_flags(train_cmd)
    train_cmd.set_defaults(run=cmd_train)
    eval_cmd = commands.add_parser("eval", help="held-out perplexity and bits per byte of a run or checkpoint; lm-eval tasks with --harness lm-eval")
    eval_cmd.add_argument("path", help="a run directory (its latest checkpoint) or a checkpoint folder (with --harness: or a transformers model directory)")
    eval_cmd.add_argument("--eval-tokens", type=positive_int, help="held-out tokens to score (default: the run's eval_tokens)")
    eval_cmd.add_argument("--tasks", help="tasks separated by commas: nanollm's synthetic probes (mqar, copy, induction; accuracy per "
                          "length), or with --harness lm-eval, lm-eval task names")
    eval_cmd.add_argument("--json", action="store_true", help="print one JSON object")
    eval_cmd.add_argument("--harness", choices=("lm-eval",), help="score tasks with EleutherAI's lm-evaluation-harness instead (the [eval] extra)")
    eval_cmd.add_argument("--include", action="append", help="with --harness lm-eval: a directory of lm-eval task YAML files (repeatable)")
    eval_cmd.add_argument("--limit", type=positive_int, help="with --harness lm-eval: score at most this many documents per task")
    eval_cmd.set_defaults(run=cmd_eval)
    consolidate_cmd = commands.add_parser("consolidate", help="write a checkpoint's model as one safetensors file (from sharded checkpoints)")
    consolidate_cmd.add_argument("path", help="a run directory (its latest checkpoint) or a checkpoint folder")
    consolidate_cmd.add_argument("-o", "--out", help="the file to write (default: model.safetensors in the checkpoint folder)")
    consolidate_cmd.set_defaults(run=cmd_consolidate)
    tokenize_cmd = commands.add_parser("tokenize", help="tokenise a corpus once into memory-mapped token shards, for --data DIR")
    tokenize_cmd.add_argument("data", nargs="?", help=KEYS["data"].metadata["doc"])
    tokenize_cmd.add_argument("-o", "--out", required=True, help="the folder to write (it must not exist)")
    for name in ("tokenizer", "data_config", "data_split", "text_field", "eval_share"):
        tokenize_cmd.add_argument("--" + name.replace("_", "-"), dest=name, type=recipe_flag_type(name), default=KEYS[name].default,
                                  metavar=name.upper(), help=KEYS[name].metadata["doc"])
    tokenize_cmd.set_defaults(run=cmd_tokenize)
    add_sweep_command(commands)


def non_negative_number(text: str) -> float:
    """argparse type: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = non_negative_number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value


def add_inference_commands(commands: argparse._SubParsersAction) -> None:
    """`nanollm generate` and `nanollm export`."""
    generate_cmd = commands.add_parser("generate", help="generate text from a run, a checkpoint or a transformers model directory")
    generate_cmd.add_argument("path", help="a run directory (its latest checkpoint), a checkpoint folder, or a transformers model directory")
    prompt = generate_cmd.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--prompts", help="a file of prompts, one a line, each continued in turn")
    generate_cmd.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default 64; fewer at the model's context)")
    generate_cmd.add_argument("--temperature", type=non_negative_number, default=0.0, help="sampling temperature; 0 (the default) is greedy")
    generate_cmd.add_argument("--top-k", type=positive_int, help="sample among the k most likely tokens only")
    generate_cmd.add_argument("--top-p", type=probability, default=1.0, help="sample among the most likely tokens holding this much probability")
    generate_cmd.add_argument("--seed", type=int, help="seed of the sampling")
    generate_cmd.add_argument("--compile", action="store_true", help="torch.compile the decoding step (a one-time cost of tens of seconds; "
                              "faster per token after it)")
    generate_cmd.set_defaults(run=cmd_generate)
    export_cmd = commands.add_parser("export", help="write a run's model as a transformers model directory (config, safetensors, tokenizer)")
    export_cmd.add_argument("path", help="a run directory (its latest checkpoint) or a checkpoint folder")
    export_cmd.add_argument("-o", "--output", required=True, help="the directory to write (must not exist)")
    export_cmd.set_defaults(run=cmd_export)


def budget_list(text: str) -> list[float]:
    """argparse type: budgets separated by commas, such as 1e14,3e14."""
    return [positive_number(part) for part in text.split(",") if part.strip()] or [positive_number(text)]


def add_sweep_command(commands: argparse._SubParsersAction) -> None:
    """`nanollm sweep`: files x budgets x sizes x seeds, trained, evaluated, tabulated and plotted."""
    from .train.tasks import TASKS

    sweep_cmd = commands.add_parser("sweep", help="train every file at every budget (and seed, and isoFLOP size); table, plots, fitted laws")
    sweep_cmd.add_argument("files", nargs="+", metavar="FILE.arch[@RECIPE.yaml]", help="the models; @RECIPE gives one its own recipe")
    sweep_cmd.add_argument("--budgets", type=budget_list, required=True, help="training budgets in FLOPs, separated by commas: 1e14,3e14")
    sweep_cmd.add_argument("--out", required=True, help="the sweep's directory: runs/, archs/, results.csv, results.json, report.md, plots")
    sweep_cmd.add_argument("--seeds", type=positive_int, default=1, help="seeds per (file, budget, size): 0 .. N-1 (default 1)")
    sweep_cmd.add_argument("--sizes", type=positive_int, default=1, help="model sizes per budget around the law's choice, active parameters x2 apart (isoFLOP profiles; default 1)")
    laws = sweep_cmd.add_mutually_exclusive_group()
    laws.add_argument("--law", help="chinchilla (default), chinchilla-paper, deepseek, or tokens-per-param=R")
    laws.add_argument("--tokens-per-param", type=positive_number, metavar="R", help="size every model for R tokens per parameter")
    sweep_cmd.add_argument("--recipe", help="the recipe of every run (a file's own @RECIPE replaces it)")
    sweep_cmd.add_argument("--tasks", help=f"score each run's final checkpoint on these tasks, separated by commas ({', '.join(TASKS)})")
    sweep_cmd.add_argument("--jobs", type=positive_int, default=1, help="training processes at once (default 1); the cores are shared among them")
    sweep_cmd.add_argument("--plan-only", action="store_true", help="size the models and write DIR/plan.sh, one `accelerate launch` per run, without training")
    add_recipe_flags(sweep_cmd, leave_out=("steps", "tokens", "budget", "default_steps", "seed"))
    sweep_cmd.set_defaults(run=cmd_sweep)


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
    compile_cmd.add_argument("--context", type=token_count, help="add the inference view at this context (e.g. 32k): prefill FLOPs, "
                                                                "decode FLOPs per token, cache bytes")
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
    add_inference_commands(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0  # a command returns an exit code only when it is not 0
    except NanollmError as error:
        sys.stderr.write(f"{error}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
