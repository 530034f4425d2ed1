"""Scale-out: the input pipeline's tokens/s per process, and checkpoint save time, at 1, 2 and 4 processes.

Run: python bench/scale_out.py [--processes 1 2 4] [--repeats 5]. Each process count is one launch of gloo processes
(torch.distributed.run) on the CPU; inside it the variants take turns repetition by repetition, so load from
elsewhere on a shared machine falls on all of them alike, and each reports its median.

Input pipeline (the embedded corpus's first 400 files as a jsonl dataset, the embedded tokenizer, rows of 512 tokens, a global batch of 16 rows):
  everyone   every process tokenises every document of the batch and keeps its rows (the previous code)
  shared     each process tokenises its share of the documents and they exchange tokens (on the fly now)
  tokenised  each process reads only its rows from a folder `nanollm tokenize` wrote (no tokeniser at all)
Checkpoints (an FSDP2 model of 4 layers, d_model 512, vocabulary 8192, after one AdamW step; fp32):
  full       the state gathered onto the main process and written there as single files (the previous layout)
  sharded    each process writes its own shards through DCP
The machine's fp32 matmul rate is printed so figures from different hosts can be compared.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from train_throughput import matmul_rate

ARCH = """
vocab_size = 8192
d_model = 512
n_heads = 8
n_kv_heads = 4
head_dim = 64
d_ff = 1536
seq_len = 512
repeat 4 < global >
"""
ROWS, LENGTH, BATCHES = 16, 512, 3
CORPUS_FILES = 400


def worker(folder: Path, work: Path, repeats: int) -> None:
    """One process of a launch: time every variant in turns; the main process writes the medians."""
    import torch.distributed as dist

    import nanollm
    import nanollm.train.data as data_module
    from nanollm.optim import build_optimizers
    from nanollm.train.checkpoint import save_checkpoint
    from nanollm.train.data import TrainingRows, open_source
    from nanollm.train.parallel import shard
    from nanollm.train.recipe import Recipe
    from nanollm.train.tokenizer import load_tokenizer
    from nanollm.train.tokens import TokenFolder, TokenRows

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = load_tokenizer(None)
    mine = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    corpus = str(work / "corpus.jsonl")
    stream = {"everyone": TrainingRows(open_source(corpus, None, "train", "text", 0), tokenizer, LENGTH, 0.02, 64, 0),
              "shared": TrainingRows(open_source(corpus, None, "train", "text", 0), tokenizer, LENGTH, 0.02, 64, 0),
              "tokenised": TokenRows(TokenFolder(str(work / "tokens"), tokenizer, None, 0.02), LENGTH, 64, 0)}
    torch.manual_seed(0)
    model = copy.deepcopy(nanollm.compile(ARCH).graph)
    shard(model, torch.device("cpu"), mixed_precision=False)
    optimizers = build_optimizers(model, Recipe().optimizer_settings())
    rows = torch.randint(0, 8192, (1, 65))
    logits, _ = model(rows[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).backward()
    for optimizer in optimizers:
        optimizer.step()
    times: dict[str, list[float]] = {name: [] for name in [*stream, "full", "sharded"]}
    for repeat in range(repeats):
        for name, source in stream.items():
            data_module.distributed = (lambda: False) if name == "everyone" else (lambda: world > 1)  # the previous code: no sharing
            dist.barrier()
            start = time.perf_counter()
            for _ in range(BATCHES):
                source.next_rows(ROWS, keep=mine)
            times[name].append(time.perf_counter() - start)
        for layout in ("full", "sharded"):
            dist.barrier()
            start = time.perf_counter()
            save_checkpoint(folder / layout, repeat, model, optimizers, {"step": repeat}, keep=1, sharded=layout == "sharded")
            times[layout].append(time.perf_counter() - start)
    if rank == 0:
        medians = {name: statistics.median(values) for name, values in times.items()}
        state_bytes = sum(path.stat().st_size for path in (folder / "sharded").rglob("*.safetensors"))
        (folder / "result.json").write_text(json.dumps({"medians": medians, "state_bytes": state_bytes}))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(Path(args.worker[0]), Path(args.worker[1]), args.repeats)
    from rich.console import Console
    from rich.table import Table

    out = Console(width=160)
    out.print(f"fp32 matmul rate: {matmul_rate() / 1e9:.1f} GFLOP/s (1024^3); {os.cpu_count()} CPUs")
    work = Path(tempfile.mkdtemp(prefix="nanollm-scale-out-"))
    try:
        from nanollm.train.data import read_source_file, stdlib_files
        from nanollm.train.tokenizer import load_tokenizer
        from nanollm.train.tokens import tokenize_corpus

        with open(work / "corpus.jsonl", "w") as corpus:  # the embedded corpus's first files, as one local dataset
            corpus.writelines(json.dumps({"text": read_source_file(path)}) + "\n" for path in stdlib_files()[:CORPUS_FILES])
        tokenize_corpus(str(work / "corpus.jsonl"), work / "tokens", load_tokenizer(None), None)
        table = Table(title=f"input pipeline ({ROWS} x {LENGTH} tokens a batch) and checkpoint save, per process", title_justify="left")
        for column in ("processes", "everyone tok/s", "shared tok/s", "tokenised tok/s", "shared / everyone", "full save s", "sharded save s", "full / sharded"):
            table.add_column(column, justify="right")
        for processes in args.processes:
            folder = work / f"p{processes}"
            folder.mkdir()
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port()),
                       __file__, "--repeats", str(args.repeats), "--worker", str(folder), str(work)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            medians = json.loads((folder / "result.json").read_text())["medians"]
            rate = {name: BATCHES * ROWS // processes * LENGTH / medians[name] for name in ("everyone", "shared", "tokenised")}
            table.add_row(str(processes), f"{rate['everyone']:,.0f}", f"{rate['shared']:,.0f}", f"{rate['tokenised']:,.0f}",
                          f"{rate['shared'] / rate['everyone']:.2f}x", f"{medians['full']:.3f}", f"{medians['sharded']:.3f}",
                          f"{medians['full'] / medians['sharded']:.2f}x")
        out.print(table)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
