"""What a run records: metrics.jsonl, TensorBoard events, and the run manifest (main process only)."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, by device-name substring (first match wins).
BF16_PEAK_FLOPS = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("RTX 4090", 165e12),
)


def peak_flops(device: torch.device, mixed_precision: bool, given: float | None) -> float | None:
    """A device's peak FLOP/s for MFU: the recipe's, else a known GPU's bf16 peak, else None."""
    if given is not None:
        return given
    if device.type != "cuda" or not mixed_precision:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in name), None)


def logged_step(line: str) -> float:
    """The step of a metrics line; infinite for one cut short (by a crash or a full disk), which resuming drops."""
    try:
        return json.loads(line)["step"]
    except ValueError:
        return math.inf


class MetricsLog:
    """One JSON object per logged step in metrics.jsonl, the same scalars (and histograms) in TensorBoard."""

    def __init__(self, run_dir: Path, resumed_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        if resumed_step is not None and self.path.exists():  # drop what was logged after the checkpoint we resume from
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if logged_step(line) <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = open(self.path, "a", encoding="utf-8")
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=None if resumed_step is None else resumed_step + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        """Append a metrics line and its scalars."""
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        """A distribution (e.g. tokens per expert) in TensorBoard."""
        self.writer.add_histogram(name, values.float().cpu(), step)

    def close(self) -> None:
        self.file.close()
        self.writer.close()


def git_revision() -> str | None:
    """The nanollm checkout's git commit (with '+dirty' for uncommitted changes), if it is a checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        return commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, processes: int) -> dict[str, Any]:
    """Versions, git revision and hardware, for the manifest."""
    versions = {"python": platform.python_version()}
    for package in ("nanollm", "torch", "transformers", "accelerate", "tokenizers", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    hardware = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "processes": processes,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    return {"versions": versions, "git": git_revision(), "hardware": hardware, "command": sys.argv,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """manifest.json, replaced atomically."""
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    staging.replace(path)
