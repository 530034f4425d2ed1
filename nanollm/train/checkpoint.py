"""Checkpoints: written atomically, tensors in safetensors, everything else in JSON (nothing is pickled).

A checkpoint is a folder `checkpoints/step_<N>/` holding
  model.safetensors      the model's full state (weights and persistent buffers), gathered if sharded
  optimizer.safetensors  the optimisers' state tensors, keyed `<parameter name>/<state key>`
  rng.safetensors        every process's torch generator states
  state.json             step, counters, optimiser hyperparameters, schedulers, the data position
It is written into a hidden temporary folder and renamed into place, so a crash mid-write leaves every
earlier checkpoint whole; `checkpoints/latest` names the newest.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_model_state_dict, set_state_dict

STEP_PREFIX = "step_"


def distributed() -> bool:
    """Whether several processes train together."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch generator states (CPU and, if present, every GPU)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([states[f"cuda{i}"] for i in range(torch.cuda.device_count())])


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                    state: dict[str, Any], keep: int) -> Path | None:
    """Write checkpoint `step` under `root` (a collective call: every process calls it); the main process writes."""
    model_state, optim_state = get_state_dict(model, optimizers, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if distributed():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if distributed() and dist.get_rank() != 0:
        dist.barrier()
        return None
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{STEP_PREFIX}*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{STEP_PREFIX}{step:08d}"
    staging = root / f".{final.name}.tmp"
    staging.mkdir()
    save_tensors(staging / "model.safetensors", model_state)
    tensors = {f"{name}/{key}": value for name, entries in optim_state["state"].items() for key, value in entries.items()}
    save_tensors(staging / "optimizer.safetensors", tensors)
    save_tensors(staging / "rng.safetensors", {f"{rank}/{key}": value for rank, s in enumerate(rngs) for key, value in s.items()})
    write_json(staging / "state.json", {**state, "param_groups": optim_state["param_groups"]})
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    pointer.replace(root / "latest")
    fsync_dir(root)
    for old in sorted(root.glob(f"{STEP_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    if distributed():
        dist.barrier()
    return final


def latest_checkpoint(path: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, a `checkpoints/` folder, or a checkpoint itself."""
    if (path / "state.json").is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and (named / "state.json").is_file():
        return named
    complete = sorted(p for p in root.glob(f"{STEP_PREFIX}*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's JSON state."""
    return json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))


def load_model(checkpoint: Path, model: nn.Module) -> None:
    """Load a checkpoint's model state (every process reads the file; a sharded model keeps its shards)."""
    set_model_state_dict(model, load_file(str(checkpoint / "model.safetensors")), options=StateDictOptions(full_state_dict=True, strict=True))


def load_checkpoint(checkpoint: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore model, optimisers and this process's generators; returns the JSON state."""
    state = read_state(checkpoint)
    optim_state: dict[str, Any] = {"state": {}, "param_groups": state.pop("param_groups")}
    for key, value in load_file(str(checkpoint / "optimizer.safetensors")).items():
        name, entry = key.rsplit("/", 1)
        optim_state["state"].setdefault(name, {})[entry] = value
    set_state_dict(model, optimizers, model_state_dict=load_file(str(checkpoint / "model.safetensors")),
                   optim_state_dict=optim_state, options=StateDictOptions(full_state_dict=True, strict=True))
    rngs: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(checkpoint / "rng.safetensors")).items():
        rank, name = key.split("/", 1)
        rngs.setdefault(int(rank), {})[name] = value
    rank = dist.get_rank() if distributed() else 0
    set_rng_state(rngs.get(rank, rngs[0]))  # a run resumed on more processes than it had: the new ones take rank 0's
    return state
