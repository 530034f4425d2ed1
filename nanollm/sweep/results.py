"""A sweep's table: one row per run, read back from its run directory (manifest, metrics, checkpoint, task scores)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from .plan import SweepRun

SIZE_COLUMNS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")
COLUMNS = ("run", "file", "budget", "size", "seed", "status", *SIZE_COLUMNS, "params", "active_params", "tokens", "flops",
           "final_loss", "final_loss_stderr", "best_loss", "bits_per_byte", "train_loss", "lr", "batch_size", "bad_steps",
           "wall_seconds")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's lines (none if the run has not logged)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            continue
    return lines


def curve(run_dir: Path) -> list[tuple[float, float]]:
    """(training FLOPs, held-out loss) at each evaluation."""
    return [(line["flops"], line["eval/loss"]) for line in read_metrics(run_dir) if "eval/loss" in line]


def row(run: SweepRun, status: str) -> dict[str, Any]:
    """A run's figures: its sizes and counts from the sizing, what it spent and reached from its run directory."""
    analysis = run.solution.analysis
    figures: dict[str, Any] = {"run": run.name, "file": run.entry.label, "budget": run.budget, "size": run.size, "seed": run.seed, "status": status,
                               **run.solution.solved_settings(), "params": analysis.params_total, "active_params": analysis.params_active}
    manifest_path = run.run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}
    metrics = read_metrics(run.run_dir)
    evaluations = [line for line in metrics if "eval/loss" in line]
    last = metrics[-1] if metrics else {}
    final = evaluations[-1] if evaluations else {}
    recipe = manifest.get("recipe", {})
    scaling = manifest.get("scaling", {})
    figures.update({
        "tokens": last.get("tokens"), "flops": last.get("flops"),
        "final_loss": final.get("eval/loss"), "final_loss_stderr": final.get("eval/loss_stderr"),
        "best_loss": min((line["eval/loss"] for line in evaluations), default=None),
        "bits_per_byte": final.get("eval/bits_per_byte"), "train_loss": last.get("loss"),
        "lr": scaling.get("lr", recipe.get("lr")), "batch_size": scaling.get("batch_size", recipe.get("batch_size")),
        "bad_steps": last.get("bad_steps", 0) if last else None,
    })
    time_path = run.run_dir / "sweep_time.json"
    figures["wall_seconds"] = json.loads(time_path.read_text(encoding="utf-8"))["wall_seconds"] if time_path.exists() else None
    for name, value in final.items():  # task scores logged by the trainer (eval_tasks)
        if name.startswith("tasks/"):
            figures[name] = value
    task_path = run.run_dir / "tasks.json"
    if task_path.exists():  # task scores of the final checkpoint, by the sweep (--tasks)
        figures.update({f"tasks/{k}": v for k, v in json.loads(task_path.read_text(encoding="utf-8"))["scores"].items()})
    return figures


def write_results(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """results.csv and results.json; returns the columns (fixed ones, then every task score found)."""
    tasks = sorted({name for r in rows for name in r if name.startswith("tasks/")})
    columns = [*COLUMNS, *tasks]
    with open(out / "results.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})
    clean = [{c: (None if isinstance(r.get(c), float) and not math.isfinite(r[c]) else r.get(c)) for c in columns} for r in rows]
    (out / "results.json").write_text(json.dumps(clean, indent=2), encoding="utf-8")
    return columns
