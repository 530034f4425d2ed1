"""The training loop: the compiled nanollm graph, trained on packed text under Accelerate.

Accelerate launches the processes and sets up devices, mixed precision and DDP; FSDP2 (one fully_shard group
per layer), activation checkpointing and torch.compile come from parallel.py; the loop itself is plain:
micro-batches with gradient accumulation, clipping, the optimisers and schedules, component statistics,
logging, evaluation and atomic checkpoints. SIGTERM or SIGINT ends it cleanly: the step finishes, every process
stops at the same one, and a checkpoint is written.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..compiled import Compiled, compile
from ..components import Component, distributed
from ..decode import sample
from ..errors import DataError, LaunchError, RecipeError, RunError
from ..human import console
from ..ir import arch_from_json, arch_to_json
from ..loss import NextTokenLoss
from ..memory import TrainingMemory, training_memory
from ..optim import build_optimizers, lr_multiplier, split_params
from .checkpoint import Checkpointer, latest_checkpoint, load_checkpoint
from .data import Source, TrainingRows, heldout_rows, open_source
from .evaluate import HeldOut, evaluate
from .health import Health, layer_grad_norms
from .log import MetricsLog, environment, peak_flops, write_manifest
from .parallel import check_launch, checkpoint_activations, gradient_sync, shard
from .recipe import LENGTH_KEYS, Recipe, load_recipe, with_overrides
from .scaling import scaled_recipe
from .tasks import parse_tasks, score_tasks
from .tokenizer import load_tokenizer
from .tokens import TokenFolder, TokenRows, is_token_folder
from .trackers import open_tracker

# The exit code of a run stopped by SIGTERM or SIGINT after checkpointing: sysexits' EX_TEMPFAIL ("try again
# later"), for a cluster script to requeue the job with --resume.
PREEMPTED_EXIT_CODE = 75

# What a resumed run may change: its length, how it runs, and how it reports; never what it computes.
RESUMABLE_KEYS = set(LENGTH_KEYS) | {"default_steps", "micro_batch_size", "compile", "activation_checkpointing", "parallel",
                                     "mixed_precision", "peak_flops", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                                     "checkpoint_format", "async_save",
                                     "tracker", "tracker_project", "tracker_group"}


@dataclass(frozen=True)
class Plan:
    """The numbers a recipe and a model fix for one run."""

    steps: int
    seq_len: int
    batch_size: int
    micro_batch_size: int
    accumulation: int
    processes: int
    flops_per_token: float  # training FLOPs per token of the model at seq_len (the analysis' exact count)
    parallel: str
    mixed_precision: bool
    compile: bool

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def flops_per_step(self) -> float:
        return self.tokens_per_step * self.flops_per_token


def plan_memory(plan: Plan, compiled: Compiled, recipe: Recipe) -> TrainingMemory:
    """Memory one process needs for this run (the model `compile --budget` reports too)."""
    muon = sum(p.numel() for p in split_params(compiled.graph).hidden_matrices.values()) if recipe.optimizer == "muon" else 0
    return training_memory(compiled.analyze(plan.seq_len), compiled.config.vocab_size, muon_params=muon, processes=plan.processes,
                           sharded=plan.parallel == "fsdp", bf16=plan.mixed_precision, micro_batch=plan.micro_batch_size)


def available_memory(device: torch.device, processes: int) -> float:
    """Bytes free for one process: the device's free memory, or this host's shared among its processes."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available / processes


def recipe_source(recipe: Recipe) -> Source:
    """A fresh reader of the recipe's documents."""
    return open_source(recipe.data, recipe.data_config, recipe.data_split, recipe.text_field, recipe.seed)


def training_rows(recipe: Recipe, tokenizer: Any, seq_len: int) -> TrainingRows | TokenRows:
    """The training stream: tokenised on the fly, or read from a folder `nanollm tokenize` wrote."""
    if is_token_folder(recipe.data):
        return TokenRows(TokenFolder(recipe.data, tokenizer, recipe.tokenizer, recipe.eval_share), seq_len, recipe.shuffle_buffer, recipe.seed)
    return TrainingRows(recipe_source(recipe), tokenizer, seq_len, recipe.eval_share, recipe.shuffle_buffer, recipe.seed)


def held_out_set(recipe: Recipe, tokenizer: Any, seq_len: int) -> HeldOut:
    """The recipe's evaluation rows, from a source of their own read in its own order: training's seed and position never touch them."""
    if is_token_folder(recipe.data):
        rows = TokenFolder(recipe.data, tokenizer, recipe.tokenizer, recipe.eval_share).heldout_rows(seq_len, recipe.eval_tokens, recipe.eval_scan)
    else:
        source = open_source(recipe.data, recipe.data_config, recipe.data_split, recipe.text_field, seed=None)
        rows = heldout_rows(source, tokenizer, seq_len, recipe.eval_share, recipe.eval_tokens, recipe.eval_scan)
    return HeldOut.build(rows, tokenizer)


def held_out_sets(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluation sets a run has scored: each entry's fingerprint from the step after its `after_step` on.

    Runs from before evaluation sets had fingerprints scored one unknown set (fingerprint None), chosen in the
    seed's document order.
    """
    return manifest["data"].get("held_out_sets", [{"after_step": 0, "fingerprint": None}])


def warn(message: str) -> None:
    """One line on stderr, never wrapped."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(message, markup=False)


class Preempted(Exception):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint; `--resume` continues it."""


class StopSignals:
    """SIGTERM and SIGINT while training: the first asks the loop to stop after the current step, with a checkpoint.

    After it, SIGINT takes its default action (the process ends at once, without a checkpoint), and a repeated SIGTERM
    changes nothing: schedulers signal a launcher and its processes alike, and the launcher forwards its own.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame: Any) -> None:
        """The handler of both signals: note the first, and hand SIGINT back to the system."""
        if self.received is not None:
            return
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if os.environ.get("RANK", "0") == "0":  # the main process speaks; a raw write, as the handler may interrupt a print
            os.write(2, f"{self.received}: finishing this step, then checkpointing and stopping (another SIGINT stops at once, "
                        f"without a checkpoint)\n".encode())

    def agreed(self, device: torch.device) -> bool:
        """Whether any process was asked to stop: a collective, so that every process stops after the same step."""
        flag = torch.tensor(float(self.received is not None), device=device)
        if distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def bf16_mixed_precision(recipe: Recipe) -> bool:
    """Whether the run computes in bf16 (autocast, or FSDP's parameter dtype): asked for, or auto on GPUs."""
    return recipe.mixed_precision == "bf16" or (recipe.mixed_precision == "auto" and torch.cuda.is_available())


def make_plan(recipe: Recipe, compiled: Compiled, accelerator: Any) -> Plan:
    """Sequence length, batch layout and run length, checked against the model and the process count."""
    config = compiled.config
    seq_len = recipe.seq_len or config.seq_len
    if seq_len > config.seq_len:
        raise RecipeError(f"seq_len {seq_len} is over the model's context of {config.seq_len} tokens (its seq_len setting)")
    processes = accelerator.num_processes
    micro = recipe.micro_batch_size or max(1, recipe.batch_size // processes)
    if recipe.batch_size % (micro * processes):
        raise RecipeError(f"batch_size {recipe.batch_size} is not a multiple of micro_batch_size {micro} x {processes} processes")
    flops = compiled.analyze(seq_len).flops_per_token_train
    tokens_per_step = recipe.batch_size * seq_len
    if recipe.steps is not None:
        steps = recipe.steps
    elif recipe.tokens is not None:
        steps = max(1, round(recipe.tokens / tokens_per_step))
    elif recipe.budget is not None:
        steps = max(1, round(recipe.budget / (flops * tokens_per_step)))
    else:
        steps = recipe.default_steps
    parallel = recipe.parallel
    if parallel == "auto":
        from accelerate.utils import parse_flag_from_env

        # the launch config's own flag: on CPUs Accelerate turns an FSDP config into DDP, but fully_shard runs there
        parallel = "fsdp" if accelerator.distributed_type.name == "FSDP" or parse_flag_from_env("ACCELERATE_USE_FSDP") else "ddp"
    compiled_run = accelerator.device.type == "cuda" if recipe.compile is None else recipe.compile
    return Plan(steps, seq_len, recipe.batch_size, micro, recipe.batch_size // (micro * processes), processes, flops,
                parallel if processes > 1 else "none", bf16_mixed_precision(recipe), compiled_run)


def resolve_run(arch_path: Path, recipe_path: str | None, overrides: dict[str, Any], out: Path | None, resume: Path | None
                ) -> tuple[Compiled, Recipe, Path, dict[str, Any] | None]:
    """The model, recipe and run directory of a new or resumed run (and the resumed run's manifest)."""
    compiled = compile(arch_path)
    if resume is None:
        recipe = load_recipe(recipe_path, overrides)
        if out is None:
            out = Path("runs") / f"{arch_path.stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        if (out / "manifest.json").exists():
            raise RunError(f"{out} already holds a run: continue it with --resume {out}, or choose another --out")
        return compiled, recipe, out, None
    if recipe_path is not None:
        raise RunError("--resume continues a run with its own recipe: drop --recipe")
    if out is not None and out.resolve() != resume.resolve():
        raise RunError("--resume writes into the run it continues: drop --out")
    try:
        manifest = json.loads((resume / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RunError(f"--resume {resume}: no run there (manifest.json missing or unreadable)") from None
    if arch_from_json(manifest["arch"]) != compiled.arch:
        raise RunError(f"--resume {resume}: {arch_path} is not the model this run trains (its .arch resolves differently)")
    fixed = sorted(set(overrides) - RESUMABLE_KEYS)
    if fixed:
        raise RunError(f"--resume keeps what the run computes; cannot change {', '.join(fixed)} (may change: length, logging, how it runs)")
    return compiled, with_overrides(manifest["recipe"], overrides), resume, manifest


RECIPE_COLUMNS = 3


def settings_table(recipe: Recipe, plan: Plan, compiled: Compiled, run_dir: Path, tokenizer: Any, source_name: str, device: Any,
                   memory: TrainingMemory, held_out: HeldOut) -> Table:
    """The resolved settings, printed when a run starts."""
    table = Table(title=f"nanollm train -> {run_dir}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    analysis = compiled.analyze(plan.seq_len)
    rows = [
        ("model", f"{analysis.n_layers} layers, d_model {compiled.config.d_model}, {analysis.params_total:,} parameters ({analysis.params_active:,} active)"),
        ("data", f"{source_name}; tokenizer {recipe.tokenizer or 'embedded byte-level BPE'} ({len(tokenizer)} tokens)"),
        ("eval", f"{held_out.tokens:,} tokens in {held_out.sequences} sequences: the held-out documents of smallest hash "
                 f"{f'among the first {recipe.eval_scan:,} documents' if recipe.eval_scan else 'in the whole source'}; set {held_out.fingerprint}"
                 + (" (short of eval_tokens: no more held-out text among the documents read)"
                    if held_out.tokens < max(1, recipe.eval_tokens // plan.seq_len) * plan.seq_len else "")),
        ("batch", f"{plan.batch_size} x {plan.seq_len} tokens = {plan.tokens_per_step:,} per step; micro-batch {plan.micro_batch_size} x {plan.accumulation} accumulation x {plan.processes} processes"),
        ("length", f"{plan.steps} steps, {plan.steps * plan.tokens_per_step:,} tokens, {plan.steps * plan.flops_per_step:.3e} FLOPs ({plan.flops_per_token:.4g} training FLOPs/token)"),
        ("runtime", f"{device}, {'bf16 mixed precision' if plan.mixed_precision else 'fp32'}, parallel {plan.parallel}, compile {'on' if plan.compile else 'off'}, activation checkpointing {'on' if recipe.activation_checkpointing else 'off'}"),
        ("memory", f"about {memory.total / 2**30:.2f} GiB per process: {memory.state / 2**30:.2f} GiB weights, gradients and optimiser state, "
                   f"{(memory.activations + memory.logits) / 2**30:.2f} GiB activations and logits"
                   + (f", {memory.fsdp_gathered / 2**30:.2f} GiB gathered layers" if memory.fsdp_gathered else "")),
    ]
    if recipe.budget is not None:
        achieved = plan.steps * plan.flops_per_step
        rows.append(("budget", f"{recipe.budget:.3e} FLOPs; achieved {achieved:.3e} ({achieved / recipe.budget - 1:+.2%}, whole steps)"))
    for name, value in rows:
        table.add_row(name, value)
    settings = list(recipe.to_json().items())
    grid = Table.grid(padding=(0, 2))
    for _ in range(RECIPE_COLUMNS):
        grid.add_column(style="dim")
        grid.add_column()
    for start in range(0, len(settings), RECIPE_COLUMNS):
        cells = [text for name, value in settings[start:start + RECIPE_COLUMNS] for text in (name, json.dumps(value))]
        grid.add_row(*cells)
    table.add_row("recipe", grid)
    return table


def component_metrics(components: dict[str, Component], totals: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every component's step metrics (named `<module>/<metric>`), added into the run totals."""
    metrics = {}
    for name, module in components.items():
        for key, value in module.finish_step().items():
            metrics[f"{name}/{key}"] = value
            entry = totals.setdefault(name, {})
            entry[key] = entry[key] + value.detach() if key in entry else value.detach().clone()
    return metrics


def summary_table(components: dict[str, Component], totals: dict[str, dict[str, torch.Tensor]], steps: int) -> Table | None:
    """The end-of-run table of components that summarise themselves (e.g. MoE expert load per layer)."""
    rows = []
    for name, module in components.items():
        row = module.summarize(totals[name], steps) if name in totals else {}
        if row:
            rows.append((name, row))
    if not rows:
        return None
    table = Table(title="components over the run", title_justify="left")
    table.add_column("module")
    columns = list(rows[0][1])
    for column in columns:
        table.add_column(column, justify="right")
    for name, row in rows:
        table.add_row(name, *(f"{row.get(c, float('nan')):.4g}" for c in columns))
    return table


def train(arch_path: Path, recipe_path: str | None = None, overrides: dict[str, Any] | None = None,
          out: Path | None = None, resume: Path | None = None) -> Path:
    """Train a model on a recipe; returns the run directory. Also continues a run (`resume`).

    SIGTERM or SIGINT stops it after the current step with a checkpoint, then raises Preempted.
    """
    from accelerate.state import PartialState

    with StopSignals() as stop:
        try:
            return run_training(Path(arch_path), recipe_path, overrides or {}, out, resume, stop)
        finally:
            # Only once run_training's frame, and DDP's reducer in it, is gone: a reducer holding the process group's
            # last reference destroys it with the GIL held while a gloo thread waits for the GIL (a deadlock at exit).
            # Without a process group there is nothing to wait for, and a full collection of a large heap (a test
            # process, a notebook) costs seconds.
            if dist.is_initialized():
                gc.collect()
            PartialState().destroy_process_group()


def run_training(arch_path: Path, recipe_path: str | None, overrides: dict[str, Any], out: Path | None, resume: Path | None,
                 stop: StopSignals) -> Path:
    """train() under its signal handlers."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list

    compiled, recipe, run_dir, manifest = resolve_run(arch_path, recipe_path, overrides, out, resume)
    # Accelerate's bf16 autocast comes with prepare_model (single process, DDP); FSDP2 casts by its own policy.
    # DDP must not broadcast buffers: components accumulate statistics in them per process (summed at the
    # step's end), and the state they update from those sums (MoE selection bias) is the same everywhere.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if bf16_mixed_precision(recipe) else "no",
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    check_launch(accelerator.num_processes)
    run_dir = Path(broadcast_object_list([str(run_dir)])[0]) if distributed() else run_dir  # one timestamp for all
    seq_len = recipe.seq_len or compiled.config.seq_len  # the scaling rule's lr and batch, before the plan lays the batch out
    recipe, scaling = scaled_recipe(recipe, compiled.analyze(seq_len).flops_per_token_train, seq_len, accelerator.num_processes,
                                    manifest.get("scaling") if manifest else None)
    plan = make_plan(recipe, compiled, accelerator)
    memory = plan_memory(plan, compiled, recipe)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    free = available_memory(accelerator.device, local_processes if accelerator.device.type == "cpu" else 1)
    if memory.total > free:
        raise LaunchError(
            f"training needs about {memory.total / 2**30:.1f} GiB per process ({memory.state / 2**30:.1f} GiB of weights, "
            f"gradients and optimiser state, {(memory.activations + memory.logits) / 2**30:.1f} GiB of activations and logits) but {free / 2**30:.1f} GiB "
            f"is free: use a smaller model, micro_batch_size or seq_len, or shard with --parallel fsdp over more devices"
        )
    main = accelerator.is_main_process
    out_console = console()

    with accelerator.main_process_first():  # the first process trains the embedded tokenizer; the others load it
        tokenizer = load_tokenizer(recipe.tokenizer)
    if len(tokenizer) > compiled.config.vocab_size:
        raise DataError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {compiled.config.vocab_size}: raise vocab_size in the .arch file")
    rows = training_rows(recipe, tokenizer, plan.seq_len)
    held_out = held_out_set(recipe, tokenizer, plan.seq_len)

    torch.manual_seed(recipe.seed)  # the same initial weights in every process, and across resumes
    sharded = plan.parallel == "fsdp"  # FSDP gives the meta model its weights as it shards it, a layer at a time
    model = copy.deepcopy(compiled.graph) if sharded else compiled.build(device=accelerator.device, dtype=torch.float32)
    if recipe.activation_checkpointing:
        checkpoint_activations(model)
    if sharded:
        shard(model, accelerator.device, plan.mixed_precision)
        wrapped = NextTokenLoss(model)
    else:
        with warnings.catch_warnings():  # torch deprecates broadcast_buffers; Accelerate's DDP kwargs offer no successor yet
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
            wrapped = accelerator.prepare_model(NextTokenLoss(model))  # DDP over processes; bf16 autocast when mixed
    for module in model.modules():  # components keyed by the tokenizer's words (Engram's canonical ids); checkpoints keep theirs
        if hasattr(module, "use_tokenizer"):
            module.use_tokenizer(tokenizer)
    runner = torch.compile(wrapped) if plan.compile else wrapped
    optimizers = build_optimizers(model, recipe.optimizer_settings())
    multiplier = lr_multiplier(recipe.schedule, plan.steps, recipe.warmup_fraction, recipe.decay_fraction, recipe.final_lr_ratio)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier) for optimizer in optimizers]

    step, tokens, flops, totals = 0, 0, 0.0, {}
    saved_step = None  # the step of the run's newest checkpoint
    health_state = None
    if manifest is not None:
        checkpoint = latest_checkpoint(run_dir, report=warn if main else None)  # every process verifies what it loads
        if checkpoint is None:
            raise RunError(f"--resume {run_dir}: the run has no complete checkpoint yet")
        state = load_checkpoint(checkpoint, model, optimizers)
        for scheduler, saved in zip(schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        rows.load_state_dict(state["data"])
        step, tokens, flops = state["step"], state["tokens"], state["flops"]
        saved_step = step
        health_state = state.get("health")  # checkpoints from before training health had none
        totals = {name: {k: torch.tensor(v, device=accelerator.device) for k, v in entry.items()} for name, entry in state["totals"].items()}
        if step >= plan.steps:
            if main:
                out_console.print(f"{run_dir} is complete at step {step} of {plan.steps}; give --steps, --tokens or --budget to extend it")
            return run_dir

    analysis = compiled.analyze(plan.seq_len)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # evaluations logged after the resumed step are logged again, on this set: the record says which set each one scored
        scored = [entry for entry in held_out_sets(manifest) if entry["after_step"] < step] if manifest is not None else []
        previous = scored[-1]["fingerprint"] if scored else None
        changed = bool(scored) and previous != held_out.fingerprint
        if changed or not scored:
            scored.append({"after_step": step, "fingerprint": held_out.fingerprint})
        if manifest is None:
            manifest = {"arch_file": str(arch_path), "arch_text": Path(arch_path).read_text(encoding="utf-8"),
                        "arch": arch_to_json(compiled.arch), "recipe": recipe.to_json(), "resumes": []}
        else:
            manifest["resumes"].append({"step": step, "recipe": recipe.to_json()})
            manifest["recipe"] = recipe.to_json()
        manifest.update({
            "plan": {**plan.__dict__, "tokens_per_step": plan.tokens_per_step, "tokens": plan.steps * plan.tokens_per_step,
                     "flops": plan.steps * plan.flops_per_step, "memory_bytes": memory.to_json()},
            "analysis": analysis.to_json(),
            "scaling": scaling,
            "data": {"source": rows.name, "tokenizer": recipe.tokenizer or "embedded", "vocab": len(tokenizer),
                     "eos_token_id": tokenizer.eos_token_id, "held_out_tokens": held_out.tokens, "held_out_bytes": held_out.bytes,
                     "held_out_sequences": held_out.sequences, "held_out_fingerprint": held_out.fingerprint, "held_out_sets": scored},
            **environment(accelerator.device, accelerator.num_processes),
        })
        write_manifest(run_dir / "manifest.json", manifest)
        out_console.print(settings_table(recipe, plan, compiled, run_dir, tokenizer, rows.name, accelerator.device, memory, held_out))
        if changed:
            earlier = f"held-out set {previous}" if previous else "an older held-out set (chosen in the seed's document order, before sets had fingerprints)"
            out_console.print(f"note: the evaluations logged up to step {step} scored {earlier}; from step {step + 1} on they score set "
                              f"{held_out.fingerprint}. Compare across the change by scoring checkpoints again with nanollm eval.", style="yellow")
    log = MetricsLog(run_dir, saved_step) if main else None
    tracker = open_tracker(recipe, run_dir, manifest.get("tracker")) if main else None
    if tracker is not None:  # its run id, for a resume to log into the same run
        manifest["tracker"] = tracker.entry
        write_manifest(run_dir / "manifest.json", manifest)
    peak = peak_flops(accelerator.device, plan.mixed_precision, recipe.peak_flops)
    sync_target = wrapped if plan.parallel == "ddp" else model
    components = {name: module for name, module in model.named_modules() if isinstance(module, Component)}
    rank = accelerator.process_index
    tasks = parse_tasks(recipe.eval_tasks) if recipe.eval_tasks else ()
    health = Health(recipe.max_bad_steps, recipe.spike_sigmas, health_state)
    per_process = plan.batch_size // plan.processes

    sharded_checkpoints = recipe.checkpoint_format == "sharded" or recipe.checkpoint_format == "auto" and plan.processes > 1
    checkpointer = Checkpointer(run_dir / "checkpoints", recipe.keep_checkpoints, sharded_checkpoints, recipe.async_save)

    def save(at: int) -> None:
        state = {"step": at, "tokens": tokens, "flops": flops, "data": rows.state_dict(),
                 "schedulers": [s.state_dict() for s in schedulers], "health": health.state_dict(),
                 "totals": {name: {k: v.tolist() for k, v in entry.items()} for name, entry in totals.items()}}
        checkpointer.save(at, model, optimizers, state)

    def run_eval() -> dict[str, float]:
        model.eval()
        with accelerator.autocast():  # the model itself: no gradients to synchronise, nothing worth compiling
            result = evaluate(model, held_out, plan.micro_batch_size, accelerator.device)
            scores = score_tasks(model, tokenizer, tasks, plan.seq_len, plan.micro_batch_size, accelerator.device) if tasks else {}
        model.train()
        return {**{f"eval/{k}": v for k, v in result.items()}, **{f"tasks/{k}": v for k, v in scores.items()}}

    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=out_console, disable=not main)
    task = progress.add_task("train", total=plan.steps, completed=step, loss="-")
    interval_start, interval_tokens, paused = time.perf_counter(), 0, 0.0
    model.train()
    final: dict[str, float] = {}
    stopped = False
    with progress:
        while step < plan.steps:
            stopped = stop.agreed(accelerator.device)
            if stopped:
                break
            batch = rows.next_rows(plan.batch_size, keep=slice(rank * per_process, (rank + 1) * per_process)).to(accelerator.device)
            step_loss = torch.zeros((), device=accelerator.device)
            step_aux = torch.zeros((), device=accelerator.device)
            for i, micro in enumerate(batch.split(plan.micro_batch_size)):
                with gradient_sync(sync_target, i == plan.accumulation - 1):
                    loss, aux_loss = runner(micro)
                    accelerator.backward((loss + aux_loss) / plan.accumulation)
                step_loss += loss.detach() / plan.accumulation
                step_aux += aux_loss.detach() / plan.accumulation
            upcoming = step + 1
            logging = upcoming % recipe.log_every == 0 or upcoming == plan.steps or bool(recipe.eval_every and upcoming % recipe.eval_every == 0)
            layer_norms = layer_grad_norms(model) if logging else {}  # before clipping, like grad_norm
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip or math.inf)
            rates = [scheduler.get_last_lr()[0] for scheduler in schedulers]  # what this step applies
            applied, mean_loss = health.check(step_loss + step_aux, grad_norm)
            report = health.spike(upcoming, mean_loss) if applied else health.skipped(upcoming)
            if report and main:
                warn(report)
            for optimizer, scheduler in zip(optimizers, schedulers):
                if applied:  # a non-finite step changes no weight and no optimiser state; the schedule moves on
                    optimizer.step()
                with warnings.catch_warnings():  # torch's warning of a scheduler stepped before its optimiser: skipping is meant
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before", category=UserWarning)
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            metrics = component_metrics(components, totals)
            step, tokens, flops = step + 1, tokens + plan.tokens_per_step, flops + plan.flops_per_step
            interval_tokens += plan.tokens_per_step
            last = step == plan.steps

            evaluating = recipe.eval_every and step % recipe.eval_every == 0 or last
            if step % recipe.log_every == 0 or evaluating:
                reduced = torch.stack([step_loss, step_aux])
                if distributed():
                    dist.all_reduce(reduced, op=dist.ReduceOp.AVG)
                norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                elapsed = time.perf_counter() - interval_start - paused
                values = {"loss": reduced[0].item(), "aux_loss": reduced[1].item(), "lr": rates[-1],
                          "grad_norm": norm.item(), "tokens": tokens, "flops": flops, "tokens_per_s": interval_tokens / elapsed}
                if len(rates) > 1:
                    values["muon_lr"] = rates[0]
                values.update({"bad_steps": health.bad_steps, "loss_spikes": health.spikes, **layer_norms})
                if peak is not None:
                    values["mfu"] = values["tokens_per_s"] * plan.flops_per_token / (peak * plan.processes)
                values.update({name: value.item() for name, value in metrics.items() if value.dim() == 0})
                if evaluating:
                    values.update(run_eval())
                if main:
                    log.write(step, values)
                    if tracker is not None:
                        tracker.log(values, step)
                    for name, value in metrics.items():
                        if value.dim() == 1:
                            log.histogram(name, value, step)
                    shown = f"loss {values['loss']:.4f}" + (f"  eval {values['eval/loss']:.4f} ± {values['eval/loss_stderr']:.4f}" if "eval/loss" in values else "")
                    progress.update(task, loss=f"{values['loss']:.4f}")
                    progress.console.print(f"step {step:>6}/{plan.steps}  {shown}  lr {values['lr']:.2e}  "
                                           f"{values['tokens_per_s']:,.0f} tok/s  {flops:.3e} FLOPs")
                final = values
                interval_start, interval_tokens, paused = time.perf_counter(), 0, 0.0  # after evaluating: not training time
            if recipe.sample_every and step % recipe.sample_every == 0 and plan.processes == 1:
                pause = time.perf_counter()
                model.eval()  # the model itself, its layers called through their decoding form
                progress.console.print(f"sample at step {step}: {sample(model, compiled.arch, tokenizer, plan.seq_len)!r}")
                model.train()
                paused += time.perf_counter() - pause
            if recipe.checkpoint_every and step % recipe.checkpoint_every == 0 or last:
                pause = time.perf_counter()
                save(step)
                saved_step = step
                paused += time.perf_counter() - pause
            progress.update(task, completed=step)
    if stopped and saved_step != step:
        save(step)
    checkpointer.close()  # the last checkpoint is whole before the run says it is done

    if main:
        log.close()
        if tracker is not None:
            tracker.finish()
        table = summary_table(components, totals, step)
        if table is not None:
            out_console.print(table)
        if stopped:
            launch = " under the same accelerate launch" if plan.processes > 1 else ""
            warn(f"stopped by {stop.received or 'a signal to another process'} at step {step} of {plan.steps}, checkpointed in "
                 f"{run_dir / 'checkpoints'}; continue with `nanollm train {arch_path} --resume {run_dir}`{launch}")
        elif "eval/loss" in final:
            out_console.print(f"done: {step} steps, {tokens:,} tokens, {flops:.3e} FLOPs; loss {final['loss']:.4f}, held-out loss "
                              f"{final['eval/loss']:.4f} ± {final['eval/loss_stderr']:.4f} (perplexity {final['eval/perplexity']:.2f}, "
                              f"{final['eval/bits_per_byte']:.4f} bits/byte; set {held_out.fingerprint}) -> {run_dir}")
    if dist.is_initialized():  # Accelerate's references to the wrapped model; train() destroys the process group
        accelerator.free_memory()
    if stopped:
        raise Preempted(f"{run_dir} stopped at step {step}")
    return run_dir


def checkpoint_model(checkpoint: Path) -> tuple[torch.nn.Module, Recipe, dict[str, Any], torch.device]:
    """A checkpoint's model rebuilt from its run's manifest (in eval mode), the run's recipe and manifest, and the device."""
    from .checkpoint import load_model

    run_dir = checkpoint.parent.parent
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RunError(f"{run_dir}: manifest.json missing or unreadable") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Compiled(arch_from_json(manifest["arch"])).build(device=device, dtype=torch.float32)
    load_model(checkpoint, model)
    model.eval()
    return model, Recipe(**manifest["recipe"]), manifest, device


def evaluate_run(path: Path, eval_tokens: int | None = None, tasks: tuple[str, ...] = ()) -> dict[str, Any]:
    """Held-out loss (with its standard error), perplexity and bits per byte of a run's newest intact checkpoint (or of a
    given checkpoint), with the fingerprint of the set scored and of the set the run's own evaluations scored at that step,
    and the scores of the given tasks."""
    from .checkpoint import read_state

    checkpoint = latest_checkpoint(path, ("model.safetensors",), warn)
    if checkpoint is None:
        raise RunError(f"{path}: no checkpoint there (give a run directory or a checkpoint folder)")
    model, recipe, manifest, device = checkpoint_model(checkpoint)
    if eval_tokens is not None:
        recipe = replace(recipe, eval_tokens=eval_tokens)
    seq_len = manifest["plan"]["seq_len"]
    tokenizer = load_tokenizer(recipe.tokenizer)
    held_out = held_out_set(recipe, tokenizer, seq_len)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        result = evaluate(model, held_out, manifest["plan"]["micro_batch_size"], device)
        scores = score_tasks(model, tokenizer, tasks, seq_len, manifest["plan"]["micro_batch_size"], device) if tasks else {}
    step = read_state(checkpoint)["step"]
    run_fingerprint = [entry["fingerprint"] for entry in held_out_sets(manifest) if entry["after_step"] < step][-1]
    return {"checkpoint": str(checkpoint), "step": step, "tokens": held_out.tokens, "bytes": held_out.bytes, "sequences": held_out.sequences,
            "fingerprint": held_out.fingerprint, "run_fingerprint": run_fingerprint, **result, "tasks": scores}
