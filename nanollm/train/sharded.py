"""Sharded tensors on disk through PyTorch Distributed Checkpoint (DCP), as safetensors files.

Each process writes the part of every tensor it holds (an FSDP shard, or its share of replicated tensors as DCP
spreads them) into a file of its own, `shard-<process + 1>-model-00001-of-00001.safetensors`, whose header records
where each piece sits in the full tensor. Reading goes the other way on any number of processes: DCP reads, for
each tensor a process holds, the pieces that overlap it (resharding). Consolidation writes one full safetensors
file from the shards a tensor at a time, so it never holds more than the largest tensor.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from ..components import distributed

# What each file's header says of its pieces (torch.distributed.checkpoint._hf_utils' names)
SHARDING_KEY, OFFSETS_KEY = "DCP_SHARDING_INFO", "saved_offsets"


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], group: Any = None) -> list[Path]:
    """Write `tensors` (plain or DTensors) into `folder`, a collective over `group`; returns the files this process wrote."""
    with warnings.catch_warnings():  # DCP warns that one process without a process group saves alone: as intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True), process_group=group,
                 no_dist=not distributed())
    rank = dist.get_rank() if distributed() else 0
    return sorted(folder.glob(f"shard-{rank + 1:05d}-*.safetensors"))


def read_shards(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `tensors` (each process's own shards, of any process count) in place from the shards in `folder`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=not distributed())


def pieces(folder: Path) -> dict[str, list[tuple[Path, list[int]]]]:
    """Every tensor's pieces in `folder`: (file, offsets in the full tensor)."""
    found: dict[str, list[tuple[Path, list[int]]]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            sharding = json.loads((handle.metadata() or {}).get(SHARDING_KEY, "{}"))
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle: no `in`)
                offsets = sharding[name][OFFSETS_KEY] if name in sharding else [0] * len(handle.get_slice(name).get_shape())
                found.setdefault(name, []).append((path, offsets))
    return found


# bytes per element of each safetensors dtype
WIDTHS = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def consolidate(folder: Path, out: Path) -> int:
    """Write the shards in `folder` as one safetensors file `out` (atomically), a tensor at a time; returns its size in bytes."""
    layout = pieces(folder)
    handles = {path: safe_open(str(path), framework="pt") for entries in layout.values() for path, _ in entries}
    header: dict[str, Any] = {}
    start = 0
    for name in sorted(layout):
        shape: list[int] = []
        for path, offsets in layout[name]:
            extent = handles[path].get_slice(name).get_shape()
            shape = [max(size, offset + length) for size, offset, length in itertools.zip_longest(shape, offsets, extent, fillvalue=0)]
        dtype = handles[layout[name][0][0]].get_slice(name).get_dtype()
        size = math.prod(shape) * WIDTHS[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size]}
        start += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    staging = out.with_name(f".{out.name}.tmp")
    with open(staging, "wb") as stream:
        stream.write(struct.pack("<Q", len(text)) + text)
        for name in sorted(layout):
            full = None
            for path, offsets in layout[name]:
                piece = handles[path].get_tensor(name)
                if full is None:
                    full = torch.empty(header[name]["shape"], dtype=piece.dtype)
                full[tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape))] = piece
            stream.write(full.reshape(-1).view(torch.uint8).numpy().tobytes())
        stream.flush()
        os.fsync(stream.fileno())
    staging.replace(out)
    return out.stat().st_size
