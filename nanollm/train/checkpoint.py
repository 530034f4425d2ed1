"""Checkpoints: written atomically, tensors in safetensors, everything else in JSON (nothing is pickled).

A checkpoint is a folder `checkpoints/step_<N>/` holding
  model.safetensors      the model's full state (weights and persistent buffers), gathered if sharded
  optimizer.safetensors  the optimisers' state tensors, keyed `<parameter name>/<state key>`
  rng.safetensors        every process's torch generator states
  state.json             step, counters, optimiser hyperparameters, schedulers, the data position, and the
                         size and SHA-256 of each file above (written last, so it vouches for what was written)
It is written into a hidden temporary folder and renamed into place, so a crash or a full disk mid-write
leaves every earlier checkpoint whole; `checkpoints/latest` names the newest. Loading takes the newest
checkpoint whose files match their checksums, and names each damaged one it skips.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

from ..components import distributed
from ..errors import RunError

STEP_PREFIX = "step_"
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


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


def file_sha256(path: Path) -> str:
    """A file's SHA-256, read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write a safetensors file and sync it; returns its size and SHA-256, read back so they vouch for what was written."""
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    except SafetensorError as error:  # how safetensors reports a failed write (a full disk): made the OSError it is
        code = re.search(r"os error (\d+)", str(error))
        raise (OSError(int(code[1]), os.strerror(int(code[1])), str(path)) if code else OSError(str(error))) from None
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}  # from the page cache: a fraction of the write's time


def set_aside(checkpoint: Path) -> None:
    """Rename a checkpoint out of the run's way as `damaged-<name>`: kept for inspection, never deleted."""
    target, copies = checkpoint.with_name(f"damaged-{checkpoint.name}"), 1
    while target.exists():
        copies += 1
        target = checkpoint.with_name(f"damaged-{checkpoint.name}-{copies}")
    checkpoint.rename(target)


def write_checkpoint(root: Path, step: int, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any],
                     rngs: list[dict[str, torch.Tensor]], state: dict[str, Any], keep: int) -> Path:
    """The main process's part of a save: write into a hidden folder, rename it into place, keep the newest `keep`.

    An OSError (a full disk) removes the partial folder, so the space it took is free again, and propagates.
    """
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{STEP_PREFIX}*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{STEP_PREFIX}{step:08d}"
    for later in root.glob(f"{STEP_PREFIX}*"):
        if later.name >= final.name:  # damaged checkpoints the run resumed before: it is rewriting their steps
            set_aside(later)
    staging = root / f".{final.name}.tmp"
    try:
        staging.mkdir()
        files = {"model.safetensors": save_tensors(staging / "model.safetensors", model_state)}
        tensors = {f"{name}/{key}": value for name, entries in optim_state["state"].items() for key, value in entries.items()}
        files["optimizer.safetensors"] = save_tensors(staging / "optimizer.safetensors", tensors)
        files["rng.safetensors"] = save_tensors(staging / "rng.safetensors",
                                                {f"{rank}/{key}": value for rank, s in enumerate(rngs) for key, value in s.items()})
        write_json(staging / "state.json", {**state, "param_groups": optim_state["param_groups"], "files": files})
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.rename(final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    pointer.replace(root / "latest")
    fsync_dir(root)
    for old in sorted(root.glob(f"{STEP_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                    state: dict[str, Any], keep: int) -> Path | None:
    """Write checkpoint `step` under `root` (a collective call: every process calls it); the main process writes.

    If the write fails (a full disk), every process raises RunError naming the problem; earlier checkpoints stay whole.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if any(optimizer.state for optimizer in optimizers):
        model_state, optim_state = get_state_dict(model, optimizers, options=options)
    else:  # step 0, before any update: get_state_dict would first step them on zero gradients, and resuming carry that step
        model_state, optim_state = get_model_state_dict(model, options=options), {"state": {}, "param_groups": []}
    if distributed():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    final, failure = None, [None]
    if not distributed() or dist.get_rank() == 0:
        try:
            final = write_checkpoint(root, step, model_state, optim_state, rngs, state, keep)
        except OSError as error:
            where = f"{error.strerror}: {error.filename}" if error.strerror and error.filename else str(error)
            failure[0] = (f"could not write the checkpoint of step {step} ({where}); the earlier checkpoints are whole: "
                          f"once that is fixed, continue with --resume {root.parent}")
    if distributed():
        dist.broadcast_object_list(failure)  # in place of a barrier: every process learns whether the save worked
    if failure[0] is not None:
        raise RunError(failure[0])
    return final


def damage(checkpoint: Path, files: tuple[str, ...]) -> str | None:
    """What is wrong with a checkpoint's state and `files` (missing, cut short, altered, unreadable), or None if they verify.

    A checkpoint written before checksums existed has only its files' structure checked (safetensors reads the header
    and the extent it declares), which finds a truncated file.
    """
    try:
        recorded = read_state(checkpoint).get("files")
    except FileNotFoundError:
        return "state.json missing"
    except (OSError, ValueError):
        return "state.json unreadable"
    for name in files:
        path = checkpoint / name
        try:
            if recorded is None:
                with safe_open(str(path), framework="pt"):
                    pass
                continue
            size, expected = path.stat().st_size, recorded[name]["bytes"]
            if size != expected:
                return f"{name} is {size:,} bytes instead of {expected:,}"
            if file_sha256(path) != recorded[name]["sha256"]:
                return f"{name} does not match its SHA-256 checksum"
        except FileNotFoundError:
            return f"{name} missing"
        except OSError as error:  # a bad sector
            return f"{name} unreadable ({error.strerror})"
        except SafetensorError as error:
            return f"{name} unreadable ({error})"
    return None


def latest_checkpoint(path: Path, files: tuple[str, ...] = TENSOR_FILES, report: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint whose state and `files` verify, in a run directory, a `checkpoints/` folder, or a checkpoint itself.

    None if there is no checkpoint at all; RunError if there are some and none verifies. Each damaged checkpoint
    skipped is reported to `report` in one line.
    """
    if path.name.startswith(STEP_PREFIX) and path.is_dir() or (path / "state.json").is_file():
        candidates = [path]
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        candidates = sorted(root.glob(f"{STEP_PREFIX}*"), reverse=True)
    skipped = []
    for candidate in candidates:
        problem = damage(candidate, files)
        if problem is None:
            if skipped and report is not None:
                unverified = "" if "files" in read_state(candidate) else " (written before checksums, so not verified)"
                for line in skipped:
                    report(f"skipped damaged checkpoint {line}; using {candidate.name}{unverified}")
            return candidate
        skipped.append(f"{candidate} ({problem})")
    if skipped:
        raise RunError(f"no checkpoint in {path} is intact: {'; '.join(skipped)}")
    return None


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
    if optim_state["state"]:
        set_state_dict(model, optimizers, model_state_dict=load_file(str(checkpoint / "model.safetensors")),
                       optim_state_dict=optim_state, options=StateDictOptions(full_state_dict=True, strict=True))
    else:  # saved at step 0: the optimisers stay as fresh as they were
        load_model(checkpoint, model)
    rngs: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(checkpoint / "rng.safetensors")).items():
        rank, name = key.split("/", 1)
        rngs.setdefault(int(rank), {})[name] = value
    rank = dist.get_rank() if distributed() else 0
    set_rng_state(rngs.get(rank, rngs[0]))  # a run resumed on more processes than it had: the new ones take rank 0's
    return state
