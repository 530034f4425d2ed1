"""A trained model for inference: its weights, IR, tokenizer and context, from a run directory, a checkpoint folder,
or a transformers model directory (what `nanollm generate`, `export` and `eval --harness lm-eval` take)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import fx

from .compiled import Compiled
from .errors import RunError
from .ir import Arch, arch_from_json


@dataclass
class Trained:
    """A model with real weights and what generating from it needs."""

    model: fx.GraphModule
    arch: Arch
    tokenizer: Any
    context: int  # the longest sequence it takes: its training seq_len, or transformers' max_position_embeddings
    run_dir: Path | None = None  # where it was trained, if in nanollm
    checkpoint: Path | None = None


def is_transformers_dir(path: Path) -> bool:
    """Whether a directory holds a transformers model (a config.json with a model_type)."""
    try:
        return "model_type" in json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> Trained:
    """The model of a run directory (its latest intact checkpoint), a checkpoint folder, or a transformers model directory."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: no such run directory, checkpoint or model directory")
    trained = load_transformers(path, device) if is_transformers_dir(path) else load_run(path, device)
    trained.model.eval()
    return trained


def check_vocabulary(path: Path, tokenizer: Any, arch: Arch) -> None:
    """RunError if the tokenizer has tokens the model has no embedding for."""
    if len(tokenizer) > arch.config.vocab_size:
        raise RunError(f"{path}: the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size of {arch.config.vocab_size}")


def load_run(path: Path, device: torch.device | str) -> Trained:
    """A nanollm run's model from its newest intact checkpoint (or the given checkpoint folder)."""
    from .train.checkpoint import latest_checkpoint, load_model
    from .train.tokenizer import load_tokenizer

    checkpoint = latest_checkpoint(path, ("model.safetensors",))
    if checkpoint is None:
        raise RunError(f"{path}: no checkpoint there (give a run directory, a checkpoint folder or a transformers model directory)")
    run_dir = checkpoint.parent.parent
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RunError(f"{run_dir}: manifest.json missing or unreadable") from None
    arch = arch_from_json(manifest["arch"])
    tokenizer = load_tokenizer(manifest["recipe"].get("tokenizer"))
    check_vocabulary(path, tokenizer, arch)
    model = Compiled(arch).build(device=device, dtype=torch.float32)
    load_model(checkpoint, model)
    return Trained(model, arch, tokenizer, manifest["plan"]["seq_len"], run_dir, checkpoint)


def load_transformers(path: Path, device: torch.device | str) -> Trained:
    """A transformers model directory of a family from_hf imports, with its tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    from .hf import arch_from_config, from_hf, load_config

    config = load_config(path)
    arch = config.nanollm_arch() if config.model_type == "nanollm" else arch_from_config(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # transformers raises OSError, ValueError or the hub client's errors
        raise RunError(f"{path}: no tokenizer there that transformers can load ({str(error).splitlines()[0]})") from None
    check_vocabulary(path, tokenizer, arch)
    transformers.utils.logging.disable_progress_bar()  # the command's output is the text alone
    if config.model_type == "nanollm":  # nanollm's own export: its IR and weights under nanollm's names
        model = Compiled(arch).build(device=device, dtype=torch.float32)
        model.load_state_dict({name.removeprefix("model."): tensor for name, tensor in load_file(str(path / "model.safetensors")).items()})
    else:
        model = from_hf(path).to(device)
    return Trained(model, arch, tokenizer, int(getattr(config, "max_position_embeddings", arch.config.seq_len)))
