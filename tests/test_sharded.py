"""Sharded checkpoints (PyTorch DCP, safetensors): written by each process, resumed on another process count, written
in the background complete or not at all, consolidated on demand, and never gathering the full optimiser state."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import run_group
from safetensors.torch import load_file

import nanollm
from nanollm.cli import main
from nanollm.train.checkpoint import latest_checkpoint, load_model, read_state
from test_train import ACCELERATE, FAST, MICRO, ROOT, metrics, train

# batch 6 in micro-batches of 1: 1, 2 and 3 processes accumulate 6, 3 and 2 of them; FSDP2 over the processes
SHARDED_RUN = ["--steps", 4, "--log-every", 1, "--batch-size", 6, "--micro-batch-size", 1, "--parallel", "fsdp",
               *FAST[2:-2], "--checkpoint-every", 2, "--keep-checkpoints", 5]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(processes: int, *args: str | Path) -> None:
    """`nanollm train ...` in `processes` gloo processes under accelerate launch."""
    command = ACCELERATE + ["--config_file", ROOT / "runtime/accelerate/multi_gpu_ddp.yaml", "--num_processes", processes,
                            "--main_process_port", free_port(), "-m", "nanollm", "train", *args]
    result = run_group([str(word) for word in command])
    assert result.returncode == 0, result.stderr[-3000:]


def back_to_step(run: Path, step: int) -> None:
    """The run as it was when checkpoint `step` was its newest."""
    for checkpoint in (run / "checkpoints").glob("step_*"):
        if int(checkpoint.name.removeprefix("step_")) > step:
            shutil.rmtree(checkpoint)
    (run / "checkpoints" / "latest").write_text(f"step_{step:08d}")


def test_a_sharded_checkpoint_of_two_processes_resumes_on_three_and_on_one(tmp_path):
    """Two FSDP2 processes write their own shards; the run resumed from step 2 on three processes (DCP reshards each
    tensor to thirds) and on one (no sharding at all) logs the uninterrupted run's losses; the model consolidated from
    the shards is the one DCP loads."""
    arch = tmp_path / "micro.arch"
    arch.write_text(MICRO)
    run = tmp_path / "two"
    launch(2, arch, "--out", run, *SHARDED_RUN)
    checkpoint = run / "checkpoints" / "step_00000002"
    state = read_state(checkpoint)
    assert state["layout"] == "sharded"
    assert sorted(state["files"]) == ["model/shard-00001-model-00001-of-00001.safetensors", "model/shard-00002-model-00001-of-00001.safetensors",
                                      "optimizer/shard-00001-model-00001-of-00001.safetensors",
                                      "optimizer/shard-00002-model-00001-of-00001.safetensors", "rng.safetensors"]
    uninterrupted = [m["loss"] for m in metrics(run)]
    for processes in (3, 1):
        resumed = tmp_path / f"on{processes}"
        shutil.copytree(run, resumed)
        back_to_step(resumed, 2)
        if processes == 1:
            assert train(arch, "--resume", resumed) == 0
        else:
            launch(processes, arch, "--resume", resumed)
        assert json.loads((resumed / "manifest.json").read_text())["plan"]["processes"] == processes
        losses = [m["loss"] for m in metrics(resumed)]
        assert len(losses) == 4 and all(abs(a - b) < 1e-5 for a, b in zip(losses, uninterrupted)), (losses, uninterrupted)
    # one process wrote on with the full layout: both layouts in one run
    assert "layout" not in read_state(latest_checkpoint(tmp_path / "on1"))

    assert main(["consolidate", str(checkpoint), "-o", str(tmp_path / "model.safetensors")]) == 0
    consolidated = load_file(tmp_path / "model.safetensors")
    model = nanollm.compile(arch).build()
    load_model(checkpoint, model)
    expected = model.state_dict()
    assert consolidated.keys() == expected.keys()
    assert all(torch.equal(consolidated[name], expected[name]) for name in expected)


# Run in a process of its own: `nanollm train` whose background write of checkpoint 2 stops for good after its shards
# (a write that outlasts the process), announcing it with a marker file.
STALLED_WRITE = """
import pathlib, sys, time
import nanollm.train.checkpoint as checkpoint
marker, written = pathlib.Path(sys.argv[1]), checkpoint.write_shards

def stalled(folder, tensors, group=None):
    files = written(folder, tensors, group)
    if folder.parent.name == ".step_00000002.tmp":
        marker.touch()
        time.sleep(600)
    return files

checkpoint.write_shards = stalled
from nanollm.cli import main
sys.exit(main(sys.argv[2:]))
"""
ASYNC_RUN = ["--steps", 4, "--log-every", 1, *FAST[:-2], "--checkpoint-every", 1, "--keep-checkpoints", 5,
             "--checkpoint-format", "sharded", "--async-save"]


def test_a_process_killed_during_a_background_save_leaves_complete_checkpoints_only(tmp_path):
    """Training goes on while checkpoint 2 is written in the background; killed then (SIGKILL), the run holds checkpoint 1
    whole and checkpoint 2 only as hidden debris, and resumes to the losses of an uninterrupted background-saving run."""
    arch = tmp_path / "micro.arch"
    arch.write_text(MICRO)
    assert train(arch, "--out", tmp_path / "uninterrupted", *ASYNC_RUN) == 0
    run, marker = tmp_path / "run", tmp_path / "stalled"
    (tmp_path / "stalled.py").write_text(STALLED_WRITE)
    command = [sys.executable, tmp_path / "stalled.py", marker, "train", arch, "--out", run, *ASYNC_RUN]
    with subprocess.Popen([str(word) for word in command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True) as job:
        try:
            while not (marker.exists() and len(metrics_lines(run)) >= 3) and job.poll() is None:
                time.sleep(0.05)  # the write of checkpoint 2 under way, and step 3 trained meanwhile
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
        assert job.wait(timeout=60) == -signal.SIGKILL, job.stderr.read()[-3000:]  # it was still running: killed by us
    checkpoints = run / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == [".step_00000002.tmp", "latest", "step_00000001"]
    assert list((checkpoints / ".step_00000002.tmp" / "model").glob("shard-*.safetensors"))  # it was being written
    assert latest_checkpoint(run) == checkpoints / "step_00000001"
    assert train(arch, "--resume", run) == 0
    assert metrics(run) == [{**line, "tokens_per_s": mine["tokens_per_s"]} for line, mine in zip(metrics(tmp_path / "uninterrupted"), metrics(run))]
    assert sorted(path.name for path in checkpoints.iterdir()) == ["latest", *(f"step_{step:08d}" for step in range(1, 5))]


def metrics_lines(run: Path) -> list[str]:
    path = run / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def test_no_process_materialises_the_full_optimiser_state_during_a_sharded_save(tmp_path):
    """Three FSDP2 processes save a model whose optimiser state is three times each one's shard: the tensors each process
    creates during the save plus the Python memory it allocates at its peak stay under three quarters of the full optimiser state,
    where the single-file save makes the main process gather all of it (which shows the measure sees gathers)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", str(free_port()),
               Path(__file__).parent / "measure_save_memory.py", tmp_path]
    result = run_group([str(word) for word in command])
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(3)]
    full = reports[0]["full_optimizer_bytes"]
    assert max(report["own_optimizer_bytes"] for report in reports) * 2.5 < full  # the full state is several times one shard
    for report in reports:  # its shards and their serialised bytes (about 1.6 shards' worth), never the whole
        assert report["sharded"]["tensor_bytes"] + report["sharded"]["python_peak"] < 0.75 * full, report
    assert reports[0]["full"]["tensor_bytes"] >= full  # the gather-to-one-file path
