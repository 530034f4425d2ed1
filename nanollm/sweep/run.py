"""Running a sweep's runs: each as its own `nanollm train` process, finished ones skipped, interrupted ones resumed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import NanollmError, RunError
from ..human import console
from ..train.checkpoint import latest_checkpoint, read_state
from ..train.tasks import parse_tasks
from ..train.trainer import PREEMPTED_EXIT_CODE
from .plan import SweepRun, check_spec, launch_commands, plan_sweep, python_command
from .results import row, write_results


def run_status(run_dir: Path) -> str:
    """'done' (its last step checkpointed), 'partial' (a checkpoint to resume from), or 'new'."""
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        return "new"
    try:
        checkpoint = latest_checkpoint(run_dir)
    except RunError:  # every checkpoint damaged: nothing to resume from
        checkpoint = None
    if checkpoint is None:
        return "new"
    steps = json.loads(manifest_path.read_text(encoding="utf-8"))["plan"]["steps"]
    return "done" if read_state(checkpoint)["step"] >= steps else "partial"


def record_wall_time(run_dir: Path, seconds: float) -> None:
    """Add a process's wall time to the run's `sweep_time.json` (summed over resumes)."""
    path = run_dir / "sweep_time.json"
    previous = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"wall_seconds": 0.0, "processes": 0}
    path.write_text(json.dumps({"wall_seconds": previous["wall_seconds"] + seconds, "processes": previous["processes"] + 1}), encoding="utf-8")


@dataclass
class Timer:
    """Seconds the sweep spends on its own work, by kind (sizing, evaluation, report), beside its runs' processes."""

    seconds: dict[str, float]

    def add(self, kind: str, start: float) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - start


@dataclass
class Started:
    """A training process under way."""

    run: SweepRun
    process: subprocess.Popen
    log: Any
    start: float


class Interrupted(Exception):
    """The sweep was stopped by a signal; its runs checkpointed, and the same command continues them."""


def command(run: SweepRun, recipe: Path | None, overrides: dict[str, Any], status: str) -> list[str]:
    """The trainer's command line for a run: a new one, or `--resume` of an interrupted one."""
    if status == "partial":
        return [*python_command(), str(run.arch_path), "--resume", str(run.run_dir)]
    return [*python_command(), *run.train_args(run.entry.recipe or recipe, overrides)]


def execute(runs: list[SweepRun], recipe: Path | None, overrides: dict[str, Any], jobs: int,
            report: Callable[[str], None], finished: Callable[[SweepRun], None], timer: Timer) -> dict[str, str]:
    """Train every run not yet done, `jobs` at a time; returns each run's outcome ('done', 'skipped', 'failed: ...').

    SIGINT or SIGTERM is passed on to the training processes, which checkpoint and stop; then Interrupted.
    `finished` is called in this process for each run as it completes (its evaluation), while others train.
    """
    outcome: dict[str, str] = {}
    pending: list[tuple[SweepRun, str]] = []
    for run in runs:
        status = run_status(run.run_dir)
        if status == "done":
            outcome[run.name] = "skipped"
            finished(run)
        else:
            if status == "new" and run.run_dir.exists():  # started but never checkpointed: start it over
                shutil.rmtree(run.run_dir)
            pending.append((run, status))
    env = dict(os.environ)
    if jobs > 1:  # share the cores among the processes rather than oversubscribe them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    active: list[Started] = []
    stopping: list[str] = []

    def stop(signum: int, frame: Any) -> None:
        if not stopping:
            stopping.append(signal.Signals(signum).name)
            report(f"{stopping[0]}: stopping the sweep's {len(active)} training process(es) at their next step, with checkpoints")
            for started in active:
                started.process.send_signal(signal.SIGTERM)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        while pending or active:
            while pending and len(active) < jobs and not stopping:
                run, status = pending.pop(0)
                run.run_dir.mkdir(parents=True, exist_ok=True)
                log = open(run.run_dir / "sweep.log", "a", encoding="utf-8")  # noqa: SIM115  open while the process runs; closed when it ends
                report(f"{'resuming' if status == 'partial' else 'training'} {run.name}")
                process = subprocess.Popen(command(run, recipe, overrides, status), stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)  # our signal handler, not the terminal, tells it to stop
                active.append(Started(run, process, log, time.perf_counter()))
            if stopping and not active:
                break
            time.sleep(0.05)
            for started in [s for s in active if s.process.poll() is not None]:
                active.remove(started)
                started.log.close()
                seconds = time.perf_counter() - started.start
                record_wall_time(started.run.run_dir, seconds)
                timer.seconds["processes"] = timer.seconds.get("processes", 0.0) + seconds
                code = started.process.returncode
                if code == 0 and run_status(started.run.run_dir) == "done":
                    outcome[started.run.name] = "done"
                    finished(started.run)
                elif code == PREEMPTED_EXIT_CODE or stopping:
                    outcome[started.run.name] = "interrupted"
                else:
                    outcome[started.run.name] = f"failed (exit {code}; see {started.run.run_dir / 'sweep.log'})"
                    report(f"{started.run.name} failed with exit code {code}: {last_line(started.run.run_dir / 'sweep.log')}")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stopping:
        raise Interrupted(stopping[0])
    return outcome


def last_line(path: Path) -> str:
    """The last non-empty line of a log."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"



def sweep(files: list[str], budgets: list[float], out: Path, seeds: int = 1, sizes: int = 1, law: str | None = None,
          recipe: Path | None = None, overrides: dict[str, Any] | None = None, tasks: str | None = None, jobs: int = 1,
          plan_only: bool = False) -> list[dict[str, Any]]:
    """Size, train (or plan), evaluate and report every run of a sweep; returns the table's rows."""
    from ..train.recipe import load_recipe

    overrides = dict(overrides or {})
    timer = Timer({})
    start = time.perf_counter()
    task_names = parse_tasks(tasks) if tasks else ()
    for path in {recipe, *(Path(f.partition("@")[2]) for f in files if "@" in f)} - {None}:
        load_recipe(path, overrides)  # a recipe or override that cannot work fails here, not in every run
    seq_len = overrides.get("seq_len")
    check_spec(out, {"files": files, "budgets": budgets, "seeds": seeds, "sizes": sizes, "law": law, "seq_len": seq_len,
                     "recipe": str(recipe) if recipe else None, "overrides": overrides})
    overrides.setdefault("tracker_group", out.resolve().name)  # an external tracker shows the sweep's runs together
    runs = plan_sweep(files, budgets, seeds, sizes, law, seq_len, out)
    timer.add("sizing", start)
    say = console().print
    if plan_only:
        lines = launch_commands(runs, recipe, overrides)
        (out / "plan.sh").write_text("#!/bin/sh\n# one training run per line: nanollm sweep --plan-only\n" + "\n".join(lines) + "\n", encoding="utf-8")
        say(f"{len(runs)} runs planned: {out / 'plan.sh'} (sized models in {out / 'archs'})")
        return []

    def finished(run: SweepRun) -> None:
        if task_names:
            begin = time.perf_counter()
            score_final_checkpoint(run, task_names)
            timer.add("evaluation", begin)

    say(f"sweep: {len(runs)} runs ({len({r.entry for r in runs})} files x {len(budgets)} budgets x {sizes} sizes x {seeds} seeds) -> {out}")
    began = time.perf_counter()
    try:
        outcome = execute(runs, recipe, overrides, jobs, lambda line: say(line, markup=False), finished, timer)
    finally:
        timer.seconds["runs"] = time.perf_counter() - began - timer.seconds.get("evaluation", 0.0)
    begin = time.perf_counter()
    rows = [row(run, outcome.get(run.name, "?")) for run in runs]
    columns = write_results(rows, out)
    from .report import (
        write_report,  # matplotlib and scipy: only once there is something to draw
    )

    write_report(rows, runs, columns, out)
    timer.add("report", begin)
    timer.seconds["total"] = time.perf_counter() - start
    (out / "timing.json").write_text(json.dumps(timer.seconds, indent=2), encoding="utf-8")
    failed = [r["run"] for r in rows if r["status"].startswith("failed")]
    say(f"results: {out / 'results.csv'}, {out / 'results.json'}; report: {out / 'report.md'}")
    if failed:
        raise NanollmError(f"sweep: {len(failed)} run(s) failed: {', '.join(failed)} (their sweep.log says why); rerun the command to retry them")
    return rows


def score_final_checkpoint(run: SweepRun, names: tuple[str, ...]) -> None:
    """The tasks' scores of a run's final checkpoint in `tasks.json` (kept while the checkpoint and task list are the same)."""
    from ..train.tasks import score_checkpoint

    checkpoint = latest_checkpoint(run.run_dir)
    path = run.run_dir / "tasks.json"
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["checkpoint"] == checkpoint.name and saved["tasks"] == list(names):
            return
    scores = score_checkpoint(checkpoint, names)
    path.write_text(json.dumps({"checkpoint": checkpoint.name, "tasks": list(names), "scores": scores}, indent=2), encoding="utf-8")
