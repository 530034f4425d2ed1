"""Checkpoints: written atomically, tensors in safetensors, everything else in JSON (nothing is pickled).

A checkpoint is a folder `checkpoints/step_<N>/` in one of two layouts. Full (one process, or `checkpoint_format: full`):
  model.safetensors      the model's full state (weights and persistent buffers), gathered if sharded
  optimizer.safetensors  the optimisers' state tensors, keyed `<parameter name>/<state key>`
Sharded (several processes, or `checkpoint_format: sharded`), each process writing its own shards through DCP:
  model/shard-<k>-model-00001-of-00001.safetensors      process k-1's pieces of the model's tensors
  optimizer/shard-<k>-model-00001-of-00001.safetensors  and of the optimisers' (keyed as above)
And in both:
  rng.safetensors        every process's torch generator states
  state.json             step, counters, optimiser hyperparameters, schedulers, the data position, the layout, and the
                         size and SHA-256 of each file above (written last, so it vouches for what was written)
It is written into a hidden temporary folder and renamed into place, so a crash or a full disk mid-write
leaves every earlier checkpoint whole; `checkpoints/latest` names the newest. Loading takes the newest
checkpoint whose files match their checksums, and names each damaged one it skips; either layout loads on any
number of processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

from ..components import distributed
from ..errors import RunError
from .sharded import consolidate, read_shards, write_shards

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


def flat_optimizer_state(optim_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The optimisers' state tensors keyed `<parameter name>/<state key>`."""
    return {f"{name}/{key}": value for name, entries in optim_state["state"].items() for key, value in entries.items()}


def prepare_staging(root: Path, step: int) -> Path:
    """The hidden folder checkpoint `step` is written into, made empty; debris of crashed writes removed, and damaged
    checkpoints of this step or later (which the run resumed before) set aside, as it is rewriting their steps."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{STEP_PREFIX}*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{STEP_PREFIX}{step:08d}"
    for later in root.glob(f"{STEP_PREFIX}*"):
        if later.name >= final.name:
            set_aside(later)
    staging = staging_folder(root, step)
    staging.mkdir()
    return staging


def staging_folder(root: Path, step: int) -> Path:
    return root / f".{STEP_PREFIX}{step:08d}.tmp"


def publish(root: Path, staging: Path, keep: int) -> Path:
    """Rename a fully written checkpoint into place, point `latest` at it, and keep the newest `keep`."""
    final = root / staging.name[1:].removesuffix(".tmp")
    staging.rename(final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    pointer.replace(root / "latest")
    fsync_dir(root)
    for old in sorted(root.glob(f"{STEP_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_checkpoint(root: Path, step: int, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any],
                     rngs: list[dict[str, torch.Tensor]], state: dict[str, Any], keep: int) -> Path:
    """The main process's part of a single-file save: write into a hidden folder, rename it into place, keep the newest `keep`.

    An OSError (a full disk) removes the partial folder, so the space it took is free again, and propagates.
    """
    staging = prepare_staging(root, step)
    try:
        files = {"model.safetensors": save_tensors(staging / "model.safetensors", model_state)}
        files["optimizer.safetensors"] = save_tensors(staging / "optimizer.safetensors", flat_optimizer_state(optim_state))
        finish_checkpoint(staging, files, rngs, state, optim_state["param_groups"])
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return publish(root, staging, keep)


def finish_checkpoint(staging: Path, files: dict[str, Any], rngs: list[dict[str, torch.Tensor]], state: dict[str, Any],
                      param_groups: list[dict[str, Any]]) -> None:
    """Write the generators and, last, state.json vouching for every file."""
    files["rng.safetensors"] = save_tensors(staging / "rng.safetensors", {f"{rank}/{key}": value for rank, s in enumerate(rngs) for key, value in s.items()})
    write_json(staging / "state.json", {**state, "param_groups": param_groups, "files": files})


def write_failure(step: int, root: Path, error: BaseException, folder: Path | None = None) -> str:
    """The one line a failed checkpoint write ends the run with (naming the file, else the `folder` being written)."""
    if isinstance(error, CheckpointException):  # DCP's collection of every process's failure: the first process's
        error = next(iter(dict(sorted(error.failures.items())).values()))
        error = error[0] if isinstance(error, tuple) else error
    filename = getattr(error, "filename", None) or folder
    where = f"{error.strerror}: {filename}" if getattr(error, "strerror", None) and filename else str(error)
    return (f"could not write the checkpoint of step {step} ({where}); the earlier checkpoints are whole: "
            f"once that is fixed, continue with --resume {root.parent}")


@dataclass
class Snapshot:
    """What one checkpoint holds, taken at its step (copied when it is written in the background)."""

    step: int
    model: dict[str, torch.Tensor]  # full tensors on the main process (full layout), or each process's shards
    optimizer: dict[str, Any]  # {"state": ..., "param_groups": ...}
    rngs: list[dict[str, torch.Tensor]]
    state: dict[str, Any]


class Checkpointer:
    """Writes a run's checkpoints, each complete or absent: in one process or sharded over all, now or in the background.

    Sharded, each process writes its own shards (PyTorch DCP, safetensors) and hashes them; the main process then
    writes the generators and state.json and renames the folder into place. In the background (`asynchronous`), a
    save takes a copy of this process's state and training goes on; the next save, or `close`, waits for it first,
    and its collectives run on a process group of their own so they never interleave with training's.
    """

    def __init__(self, root: Path, keep: int, sharded: bool, asynchronous: bool) -> None:
        self.root, self.keep, self.sharded = root, keep, sharded
        self.main = not distributed() or dist.get_rank() == 0
        self.group = dist.new_group(backend="gloo") if distributed() and asynchronous else None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if asynchronous else None
        self.pending: Future | None = None

    def save(self, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer], state: dict[str, Any]) -> None:
        """Checkpoint `step` (a collective call); RunError if this or the previous background write failed."""
        self.wait()
        snapshot = self.snapshot(step, model, optimizers, state)
        if self.executor is None:
            self.write(snapshot)
        else:
            self.pending = self.executor.submit(self.write, snapshot)

    def wait(self) -> None:
        """Finish the background write under way, if any."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the background write under way and stop its thread."""
        try:
            self.wait()
        finally:
            if self.executor is not None:
                self.executor.shutdown()

    def snapshot(self, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer], state: dict[str, Any]) -> Snapshot:
        options = StateDictOptions(full_state_dict=not self.sharded, cpu_offload=not self.sharded)
        if any(optimizer.state for optimizer in optimizers):
            model_state, optim_state = get_state_dict(model, optimizers, options=options)
        else:  # step 0, before any update: get_state_dict would first step them on zero gradients, and resuming carry that step
            model_state, optim_state = get_model_state_dict(model, options=options), {"state": {}, "param_groups": []}
        if distributed():
            rngs = [None] * dist.get_world_size()
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if self.executor is not None:  # training goes on while it is written: copy what the next steps change
            model_state = {name: tensor.detach().clone() for name, tensor in model_state.items()}
            optim_state = {"state": {name: {key: value.detach().clone() if torch.is_tensor(value) else value for key, value in entries.items()}
                                     for name, entries in optim_state["state"].items()},
                           "param_groups": json.loads(json.dumps(optim_state["param_groups"]))}
            state = json.loads(json.dumps(state))
        return Snapshot(step, model_state, optim_state, rngs, state)

    def agree(self, failure: str | None) -> str | None:
        """Every process's failure, the first of them, known to all (a collective)."""
        if not distributed():
            return failure
        failures: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure, group=self.group)
        return next((f for f in failures if f is not None), None)

    def write(self, snapshot: Snapshot) -> Path | None:
        """Write a snapshot (every process calls it); RunError on every process if any failed."""
        if not self.sharded:
            final, failure = None, None
            if self.main:
                try:
                    final = write_checkpoint(self.root, snapshot.step, snapshot.model, snapshot.optimizer, snapshot.rngs, snapshot.state, self.keep)
                except OSError as error:
                    failure = write_failure(snapshot.step, self.root, error)
            failure = self.agree(failure)  # in place of a barrier: every process learns whether the save worked
            if failure is not None:
                raise RunError(failure)
            return final
        return self.write_sharded(snapshot)

    def write_sharded(self, snapshot: Snapshot) -> Path | None:
        staging, failure = staging_folder(self.root, snapshot.step), None
        if self.main:
            try:
                prepare_staging(self.root, snapshot.step)
            except OSError as error:
                failure = write_failure(snapshot.step, self.root, error)
        failure = self.agree(failure)
        files: dict[str, Any] = {}
        folder = staging
        if failure is None:
            try:
                parts = {"model": snapshot.model, "optimizer": flat_optimizer_state(snapshot.optimizer)}
                for part, tensors in parts.items():
                    if tensors:
                        folder = staging / part
                        for path in write_shards(folder, tensors, self.group):
                            files[f"{part}/{path.name}"] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
            except (OSError, CheckpointException) as error:  # DCP's writes name no file: the folder they were writing
                failure = write_failure(snapshot.step, self.root, error, folder)
            failure = self.agree(failure)
        if failure is None and distributed():
            everyone: list[dict[str, Any]] = [{}] * dist.get_world_size()
            dist.all_gather_object(everyone, files, group=self.group)
            files = {name: entry for each in everyone for name, entry in sorted(each.items())}
        final = None
        if failure is None and self.main:
            try:
                finish_checkpoint(staging, files, snapshot.rngs, {**snapshot.state, "layout": "sharded"}, snapshot.optimizer["param_groups"])
                final = publish(self.root, staging, self.keep)
            except OSError as error:
                failure = write_failure(snapshot.step, self.root, error)
        failure = self.agree(failure)
        if failure is not None:
            if self.main:
                shutil.rmtree(staging, ignore_errors=True)  # the space it took is free again
            raise RunError(failure)
        return final


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                    state: dict[str, Any], keep: int, sharded: bool = False) -> Path | None:
    """Write checkpoint `step` under `root` now (a collective call: every process calls it).

    If the write fails (a full disk), every process raises RunError naming the problem; earlier checkpoints stay whole.
    """
    checkpointer = Checkpointer(root, keep, sharded, asynchronous=False)
    return checkpointer.write(checkpointer.snapshot(step, model, optimizers, state))


def part_files(recorded: dict[str, Any], part: str) -> list[str]:
    """The recorded files holding `part` (e.g. model.safetensors): the file itself, or the shards in its folder (model/)."""
    folder = part.removesuffix(".safetensors") + "/"
    shards = [name for name in recorded if name.startswith(folder)]
    return shards or [part]


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
    names = list(files) if recorded is None else [name for part in files for name in part_files(recorded, part)]
    for name in names:
        path = checkpoint / name
        try:
            if recorded is None:
                with safe_open(str(path), framework="pt"):
                    pass
                continue
            if name not in recorded:
                return f"{name} missing"
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
    """Load a checkpoint's model state, of either layout (a sharded model keeps its shards; DCP reshards as needed)."""
    if read_state(checkpoint).get("layout") == "sharded":
        model_state = get_model_state_dict(model)
        read_shards(checkpoint / "model", model_state)
        set_model_state_dict(model, model_state, options=StateDictOptions(strict=True))
        return
    set_model_state_dict(model, load_file(str(checkpoint / "model.safetensors")), options=StateDictOptions(full_state_dict=True, strict=True))


def load_checkpoint(checkpoint: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore model, optimisers and this process's generators from a checkpoint of either layout; returns the JSON state."""
    state = read_state(checkpoint)
    param_groups = state.pop("param_groups")
    if state.get("layout") == "sharded":
        if any(name.startswith("optimizer/") for name in state["files"]):
            model_state, optim_state = get_state_dict(model, optimizers)  # gives the optimisers' state its shapes and shards
            read_shards(checkpoint / "model", model_state)
            read_shards(checkpoint / "optimizer", flat_optimizer_state(optim_state))
            set_state_dict(model, optimizers, model_state_dict=model_state, optim_state_dict={"state": optim_state["state"], "param_groups": param_groups},
                           options=StateDictOptions(strict=True))
        else:  # saved at step 0: the optimisers stay as fresh as they were
            load_model(checkpoint, model)
    else:
        optim_state: dict[str, Any] = {"state": {}, "param_groups": param_groups}
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


def consolidate_checkpoint(path: Path, out: Path | None = None) -> tuple[Path, Path]:
    """Write the model of a run's newest intact checkpoint (or of a given checkpoint) as one safetensors file, a tensor at a
    time, never reading the optimiser state; returns (checkpoint, file). A full-layout checkpoint's own file is copied."""
    checkpoint = latest_checkpoint(path, ("model.safetensors",))
    if checkpoint is None:
        raise RunError(f"{path}: no checkpoint there (give a run directory or a checkpoint folder)")
    out = out or checkpoint / "model.safetensors"
    if read_state(checkpoint).get("layout") != "sharded":
        if out.resolve() != (checkpoint / "model.safetensors").resolve():
            shutil.copyfile(checkpoint / "model.safetensors", out)
        return checkpoint, out
    consolidate(checkpoint / "model", out)
    return checkpoint, out
