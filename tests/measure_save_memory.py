"""Launched by test_sharded.py under torch.distributed.run: the memory each process allocates while saving a checkpoint,
sharded and single-file, of an FSDP2 model after one AdamW step. Writes rank<k>.json into the folder it is given.

Tensors are counted by a dispatch mode adding up the bytes of every tensor an operation creates (an upper bound of
their peak); Python's own allocations (the serialised safetensors bytes) by tracemalloc's peak.
"""
from __future__ import annotations

import copy
import json
import sys
import tracemalloc
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

import nanollm
from nanollm.optim import build_optimizers
from nanollm.train.checkpoint import save_checkpoint
from nanollm.train.parallel import shard
from nanollm.train.recipe import Recipe
from test_train import MICRO


class CreatedBytes(TorchDispatchMode):
    """Adds up the bytes of the tensors operations return on storage they did not get as an input (views are free)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = {storage(t) for t in tree_leaves((args, kwargs))}
        for tensor in tree_leaves(result):
            if storage(tensor) not in inputs | {None}:
                self.total += tensor.untyped_storage().nbytes()
        return result


def storage(value) -> int | None:
    """The address of a plain tensor's storage (None for anything else: wrapper subclasses such as DTensor hold none)."""
    if not isinstance(value, torch.Tensor) or is_traceable_wrapper_subclass(value):
        return None
    return value.untyped_storage().data_ptr()


def measured_save(folder: Path, model, optimizers, sharded: bool) -> dict[str, int]:
    tracemalloc.start()
    with CreatedBytes() as created:
        save_checkpoint(folder, 1, model, optimizers, {"step": 1}, keep=1, sharded=sharded)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"tensor_bytes": created.total, "python_peak": peak}


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = copy.deepcopy(nanollm.compile(MICRO).graph)
    shard(model, torch.device("cpu"), mixed_precision=False)
    optimizers = build_optimizers(model, Recipe().optimizer_settings())
    rows = torch.randint(0, 8192, (2, 17))
    logits, _ = model(rows[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).backward()
    for optimizer in optimizers:
        optimizer.step()
    states = [value for optimizer in optimizers for entries in optimizer.state.values() for value in entries.values()]
    report = {
        "full_optimizer_bytes": sum(v.numel() * v.element_size() for v in states),  # a DTensor's numel is the full tensor's
        "own_optimizer_bytes": sum((v.to_local() if isinstance(v, DTensor) else v).untyped_storage().nbytes() for v in states),
        "sharded": measured_save(out / "sharded", model, optimizers, sharded=True),
        "full": measured_save(out / "full", model, optimizers, sharded=False),
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        main(Path(sys.argv[1]))
    finally:  # only once main's frame (the sharded model) is gone: destroying gloo under live FSDP state can abort a rank
        dist.destroy_process_group()
