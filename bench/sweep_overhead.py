"""The sweep's own time against its runs' training time: sizing, scheduling, task evaluation and the report.

Run: python bench/sweep_overhead.py [--budgets 4e12,8e12] [--tasks mqar,copy,induction]. It runs `nanollm sweep` as a
user would (its own process) on `archs/qwen3_tiny.arch` and its MoE variant at the given budgets, one seed, with the
README sweep's settings (sequences of 128 tokens, batches of 4, 8,192 held-out tokens), into a temporary folder, and splits the command's wall time into the training processes' wall time (each a `nanollm train`,
startup included, as a hand-run would pay it) and everything else: the sweep's start, sizing, starting and waiting
on processes, scoring each final checkpoint on the tasks, the table and the figures. Target: the rest <= 5% of the
training processes' time. The host is shared, so the fp32 matmul rate is printed beside the figures.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_throughput import matmul_rate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="4e12,8e12")  # runs of one to two minutes on an idle 2-core host
    parser.add_argument("--tasks", default="mqar,copy,induction")
    args = parser.parse_args()
    rate_before = matmul_rate()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "sweep"
        files = [str(ROOT / "archs" / "qwen3_tiny.arch"), str(ROOT / "archs" / "qwen3_tiny_moe.arch")]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "nanollm", "sweep", *files, "--budgets", args.budgets, "--tasks", args.tasks,
                        "--seq-len", "128", "--batch-size", "4", "--eval-tokens", "8192", "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
        total = time.perf_counter() - start
        timing = json.loads((out / "timing.json").read_text())
        rows = json.loads((out / "results.json").read_text())
    rate_after = matmul_rate()
    training = timing["processes"]
    own = total - training
    print(f"fp32 matmul rate (1024^3): {rate_before / 1e9:.0f} GFLOP/s before, {rate_after / 1e9:.0f} after (shared host)")
    print(f"{len(rows)} runs, {sum(r['tokens'] for r in rows):,} tokens; command {total:.1f} s, training processes {training:.1f} s")
    print(f"the sweep's own time: {own:.1f} s = {own / training:.2%} of training (target <= 5%)")
    scheduling = timing["runs"] - training
    for name, seconds in (("start and sizing", total - timing["total"] + timing["sizing"]), ("scheduling", scheduling),
                          ("task evaluation", timing.get("evaluation", 0.0)), ("table and figures", timing["report"])):
        print(f"  {name:18} {seconds:7.2f} s  {seconds / training:6.2%}")


if __name__ == "__main__":
    main()
