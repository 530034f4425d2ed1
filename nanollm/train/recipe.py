"""Training settings as plain data: a YAML recipe, then command-line overrides, checked in one place."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError, did_you_mean
from ..optim import OptimizerSettings


def option(default: Any, doc: str, choices: tuple[str, ...] | None = None) -> Any:
    """A Recipe field carrying its documentation and, for strings, its allowed values."""
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass(frozen=True)
class Recipe:
    """Everything about a training run except the model. The defaults are the embedded CPU run."""

    # data
    data: str | None = option(None, "local .txt/.jsonl/.parquet file, folder or glob, or a Hugging Face dataset name; none: the Python standard library's sources")
    data_config: str | None = option(None, "Hugging Face dataset configuration name")
    data_split: str = option("train", "Hugging Face dataset split")
    text_field: str = option("text", "the field holding the text in jsonl/parquet/dataset rows")
    tokenizer: str | None = option(None, "Hugging Face tokenizer directory or name; none: a byte-level BPE trained on the standard library")
    seq_len: int | None = option(None, "tokens per training sequence; none: the model's seq_len")
    batch_size: int = option(8, "sequences per optimiser step, over all processes")
    micro_batch_size: int | None = option(None, "sequences per forward pass in each process; none: batch_size / processes")
    shuffle_buffer: int = option(256, "documents held in the shuffle buffer")
    eval_share: float = option(0.02, "share of documents held out for evaluation (chosen by content hash)")
    eval_tokens: int = option(32768, "held-out tokens per evaluation")
    eval_scan: int | None = option(20000, "documents read, in the source's own order, to choose the evaluation set from; none: the whole source")
    eval_tasks: str | None = option(None, "synthetic probes scored at each evaluation, separated by commas: mqar, copy, induction")
    # length (at most one; none of them: `steps` of the recipe)
    steps: int | None = option(None, "optimiser steps in all, counted from the start of the run")
    tokens: int | None = option(None, "training tokens in all")
    budget: float | None = option(None, "training compute in FLOPs (the model's exact training FLOPs per token)")
    default_steps: int = option(120, "steps when none of steps, tokens, budget is given")
    # optimisation
    optimizer: str = option("adamw", "adamw; or muon on the hidden matrices with adamw on the embedding, head and norms", ("adamw", "muon"))
    lr: float = option(3e-3, "AdamW peak learning rate")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    weight_decay: float = option(0.1, "decoupled weight decay of matrices (norms and biases: none)")
    muon_lr: float = option(0.02, "Muon peak learning rate")
    muon_momentum: float = option(0.95, "Muon momentum")
    muon_nesterov: bool = option(True, "Nesterov momentum in Muon")
    muon_ns_steps: int = option(5, "Newton-Schulz iterations per Muon update")
    muon_adjust_lr: str = option("original", "Muon's per-matrix lr scale: original sqrt(max(1, A/B)), or match_rms_adamw 0.2 sqrt(max(A, B))", ("original", "match_rms_adamw"))
    schedule: str = option("cosine", "warmup then cosine decay, or wsd: warmup-stable-decay", ("cosine", "wsd"))
    warmup_fraction: float = option(0.05, "share of the steps spent warming up linearly from 0")
    decay_fraction: float = option(0.2, "wsd: share of the steps spent decaying linearly at the end")
    final_lr_ratio: float = option(0.1, "learning rate at the end, as a share of the peak")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    max_bad_steps: int = option(10, "steps with a non-finite loss or gradient that are skipped (not applied) before the run stops")
    spike_sigmas: float = option(6.0, "report a loss above the running mean by this many running standard deviations (0: never)")
    scaling_rule: str = option("constant", "lr and batch_size: the recipe's at every scale, or deepseek: 0.3118 C^-0.125 and 0.2920 C^0.3271 tokens from the run's compute C",
                               ("constant", "deepseek"))
    # runtime
    seed: int = option(0, "seed of initialisation, data order and router noise")
    compile: bool | None = option(None, "torch.compile the model; none: on for GPUs, off on CPU")
    activation_checkpointing: bool = option(False, "recompute each mixer and FFN in the backward pass")
    parallel: str = option("auto", "ddp or fsdp (FSDP2 fully_shard per layer) over several processes; auto: fsdp when the Accelerate config asks for FSDP", ("auto", "ddp", "fsdp"))
    mixed_precision: str = option("auto", "bf16 or no; auto: bf16 on GPUs, fp32 on CPU (where bf16 is far slower)", ("auto", "bf16", "no"))
    peak_flops: float | None = option(None, "peak FLOP/s of one device, for model-FLOPs utilisation; none: known GPUs only")
    # logging and checkpoints
    log_every: int = option(5, "steps between metrics lines (the last step always logs)")
    eval_every: int = option(50, "steps between held-out evaluations (0: only at the end)")
    sample_every: int = option(0, "steps between greedy samples of the model's text, printed (0: never; one process only)")
    checkpoint_every: int = option(50, "steps between checkpoints (0: only at the end; the last step always saves)")
    keep_checkpoints: int = option(2, "checkpoints kept in the run directory")
    checkpoint_format: str = option("auto", "sharded: each process writes its own shards (PyTorch DCP, safetensors); full: one file of each "
                                    "gathered on the main process; auto: sharded when there are several processes", ("auto", "full", "sharded"))
    async_save: bool = option(False, "write checkpoints in the background while training goes on (each still complete or absent)")
    tracker: str = option("tensorboard", "where metrics go besides metrics.jsonl and TensorBoard: wandb, trackio, mlflow or aim when installed",
                          ("tensorboard", "wandb", "trackio", "mlflow", "aim"))
    tracker_project: str | None = option(None, "the tracker's project (W&B, trackio) or experiment (MLflow; Aim without a group); none: nanollm")
    tracker_group: str | None = option(None, "the tracker's group of runs (Aim: its experiment); a sweep sets its directory's name")

    def check(self) -> None:
        """RecipeError (one line) for values that cannot work."""
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata["choices"]
            if choices and value not in choices:
                raise RecipeError(f"recipe: {f.name} = {value!r}: choose one of {', '.join(choices)}")
        for name in ("seq_len", "batch_size", "micro_batch_size", "shuffle_buffer", "eval_tokens", "eval_scan", "steps", "tokens",
                     "default_steps", "muon_ns_steps", "log_every", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RecipeError(f"recipe: {name} must be at least 1, got {value}")
        for name in ("lr", "muon_lr", "eps", "budget", "peak_flops"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise RecipeError(f"recipe: {name} must be a positive number, got {value}")
        for name in ("eval_share", "warmup_fraction", "decay_fraction", "final_lr_ratio", "beta1", "beta2", "muon_momentum"):
            if not 0 <= getattr(self, name) <= 1:
                raise RecipeError(f"recipe: {name} must be between 0 and 1, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "eval_every", "sample_every", "checkpoint_every", "max_bad_steps", "spike_sigmas"):
            if getattr(self, name) < 0:
                raise RecipeError(f"recipe: {name} must not be negative, got {getattr(self, name)}")
        if self.eval_tasks is not None:
            from .tasks import parse_tasks

            parse_tasks(self.eval_tasks)
        lengths = [name for name in ("steps", "tokens", "budget") if getattr(self, name) is not None]
        if len(lengths) > 1:
            raise RecipeError(f"recipe: {' and '.join(lengths)} both set the run's length: give one")
        if self.schedule == "wsd" and self.warmup_fraction + self.decay_fraction > 1:
            raise RecipeError("recipe: warmup_fraction + decay_fraction is more than the whole run")

    def to_json(self) -> dict[str, Any]:
        """Plain-data form."""
        return dataclasses.asdict(self)

    def optimizer_settings(self) -> OptimizerSettings:
        """The optimisers' part of the recipe."""
        return OptimizerSettings(**{f.name: getattr(self, f.name) for f in fields(OptimizerSettings)})


KEYS = {f.name: f for f in fields(Recipe)}
LENGTH_KEYS = ("steps", "tokens", "budget")


def convert(name: str, value: Any, where: str) -> Any:
    """A recipe value checked against its field's type (ints accepted for floats; None where allowed)."""
    kind = KEYS[name].type
    optional = "None" in kind
    base = kind.replace(" | None", "")
    if value is None:
        if optional:
            return None
        raise RecipeError(f"{where}: {name} cannot be empty")
    if base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, str):
        return value
    wanted = {"int": "a whole number", "float": "a number", "bool": "true or false"}.get(base, "text")
    raise RecipeError(f"{where}: {name} takes {wanted}, got {value!r}")


def parse_value(name: str, text: str) -> Any:
    """A command-line override's text, type-checked: numbers as Python reads them (1e12, 3e-3), else YAML (true, null)."""
    kind = KEYS[name].type
    if kind.startswith("str"):
        return convert(name, None if text == "null" and "None" in kind else text, "command line")
    value: Any = None if text == "null" else text
    for read in (int, float) if kind.startswith(("int", "float")) else (yaml.safe_load,):
        try:
            value = read(text)
            break
        except (ValueError, yaml.YAMLError):
            continue
    return convert(name, value, "command line")


def load_recipe(path: str | Path | None, overrides: dict[str, Any]) -> Recipe:
    """The recipe file's settings (or the defaults) with overrides applied; unknown keys and bad values are RecipeErrors."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as error:
            raise RecipeError(f"cannot read recipe {path}: {error.strerror or error}") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise RecipeError(f"{where}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of settings (key: value)")
        for name, value in data.items():
            if name not in KEYS:
                hint = did_you_mean(str(name), KEYS)
                raise RecipeError(f"{path}: unknown recipe key '{name}'" + (f" ({hint})" if hint else ""))
            values[name] = convert(name, value, str(path))
    return with_overrides(values, overrides)


def with_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> Recipe:
    """A checked recipe from settings and overrides; a length among the overrides replaces the settings' length."""
    if any(name in LENGTH_KEYS for name in overrides):
        values = {k: v for k, v in values.items() if k not in LENGTH_KEYS}
    recipe = Recipe(**{**values, **overrides})
    recipe.check()
    return recipe
