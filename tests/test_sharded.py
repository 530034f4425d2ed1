"""Sharded checkpoints (PyTorch DCP, safetensors): written by each process, resumed on another process count, written
in the background complete or not at all, consolidated on demand, and never gathering the full optimiser state."""
from __future__ import annotations

import json
import shutil
import socket
import sys
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
