"""How long `nanollm compile` takes: whole command, and the in-process analysis of every shipped file.

Run: python bench/compile_speed.py [--against CHECKOUT]. Timings are medians over a few runs; `import torch`
is measured in the same run, in turns with the command, as its floor, because this machine is shared and its
absolute speed varies. The command is timed twice: with its analysis kept in nanollm's cache folder (every run
after the first of an architecture) and counted afresh (NANOLLM_ANALYSIS_CACHE=0), what a new user's first run
pays: fvcore's import and its traces, on meta tensors under nanollm.shapes' rules (torch's Python meta kernels would
import sympy and torch._dynamo, over a second). The first analysis in a fresh process is timed alone, with the heavy
modules it imported. Targets (issue #20): the command within 0.5 s of the floor; each published architecture
analysed in under 1 s in a warm process.
`--against` times the same command from another checkout of nanollm (e.g. `git worktree add ../old REV`),
the two taking turns, with the analysis read back and counted afresh, and prints wall and CPU times and their ratios.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "archs" / "qwen3_0_6b.arch"
RUNS = 3
PUBLISHED = ("qwen3_30b_a3b.arch", "mixtral_8x7b.arch", "deepseek_v3.arch")  # the largest shipped and imported files


def wall(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Wall time of a command, process start to exit."""
    return timed(argv, env)[0]


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of a command, process start to exit. On a loaded host the CPU
    time moves less than the wall time: it leaves out the time the process waited for a core. Run from the folder
    its PYTHONPATH names first (else this checkout): `python -m` puts the working folder ahead of PYTHONPATH."""
    folder = (env or {}).get("PYTHONPATH", str(ROOT)).split(os.pathsep)[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env, cwd=folder)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def in_turns(commands: list[tuple[list[str], dict[str, str] | None]], runs: int) -> list[tuple[float, float]]:
    """Median wall and CPU times of several commands (argv, environment), run in turns so that load falls on all alike."""
    times = [[] for _ in commands]
    for _ in range(runs):
        for kept, (argv, env) in zip(times, commands):
            kept.append(timed(argv, env))
    return [(statistics.median(w for w, _ in kept), statistics.median(c for _, c in kept)) for kept in times]


def compared(argv: list[str], checkouts: list[Path], runs: int, env: dict[str, str]) -> list[tuple[float, float]]:
    """Median wall and CPU times of the same command run from each checkout (its package first on the path), taking turns."""
    return in_turns([(argv, {**env, "PYTHONPATH": str(checkout)}) for checkout in checkouts], runs)


HEAVY = ("sympy", "torch._dynamo", "fvcore")  # what a first analysis may import: torch's meta kernels' dependencies, the FLOP counter


def first_analysis() -> tuple[float, list[str]]:
    """Analysis time of the baseline in a fresh process (one-time imports included), and which HEAVY modules it imported."""
    code = (
        f"import sys, time, nanollm; c = nanollm.compile({str(BASELINE)!r}); t = time.perf_counter(); c.analysis; "
        f"print(time.perf_counter() - t, *[m for m in {HEAVY!r} if m in sys.modules])"
    )
    seconds, *imported = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return float(seconds), imported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, help="another checkout of nanollm to time the same command from")
    parser.add_argument("--runs", type=int, default=7, help="turns of the command, its floor, and --against")
    args = parser.parse_args()
    import nanollm
    import nanollm.analysis

    command_line = [sys.executable, "-m", "nanollm", "compile", str(BASELINE), "--json"]
    afresh = {**os.environ, "NANOLLM_ANALYSIS_CACHE": "0"}
    if args.against:
        for how, env in (("analysis read back", os.environ), ("counting afresh", afresh)):
            ours, theirs = compared(command_line, [ROOT, args.against.resolve()], args.runs, env)
            Console().print(f"`nanollm compile qwen3_0_6b.arch --json`, {how}: this checkout {ours[0]:.2f} s (CPU {ours[1]:.2f} s), "
                            f"{args.against} {theirs[0]:.2f} s (CPU {theirs[1]:.2f} s); ratios {ours[0] / theirs[0]:.3f} wall, "
                            f"{ours[1] / theirs[1]:.3f} CPU (medians of {args.runs}, taking turns)")
    wall(command_line)  # the analysis of this architecture is now in the cache folder
    torch_import, command, counted = in_turns([([sys.executable, "-c", "import torch"], None), (command_line, None), (command_line, afresh)],
                                              args.runs)
    cold, imported = first_analysis()

    nanollm.compile("global").analyze(64)  # one-time imports out of the way
    rows = []
    for path in sorted((ROOT / "archs").glob("*.arch")):
        lowers, analyses = [], []
        for _ in range(RUNS):
            nanollm.analysis._MACS.clear()  # count afresh: no FLOP counts kept from the previous run
            start = time.perf_counter()
            compiled = nanollm.compile(path)
            lowered = time.perf_counter()
            compiled.analyze(compiled.config.seq_len)
            lowers.append(lowered - start)
            analyses.append(time.perf_counter() - lowered)
        rows.append((path.name, compiled.config.n_layers, statistics.median(lowers), statistics.median(analyses)))

    load = os.getloadavg()[0]
    table = Table(title=f"nanollm compile speed (commands: medians of {args.runs} turns; files: medians of {RUNS}; load {load:.1f} on "
                        f"{os.cpu_count()} cores)", title_justify="left")
    for name in ("measure", "seconds", "CPU seconds"):
        table.add_column(name, justify="left" if name == "measure" else "right")
    table.add_row("`python -c 'import torch'` (the floor)", f"{torch_import[0]:.2f}", f"{torch_import[1]:.2f}")
    table.add_row("`nanollm compile qwen3_0_6b.arch --json`, process start to exit (analysis kept in the cache folder)",
                  f"{command[0]:.2f}", f"{command[1]:.2f}")
    table.add_row("  minus the floor (target 0.5 s)", f"{command[0] - torch_import[0]:.2f}", f"{command[1] - torch_import[1]:.2f}")
    table.add_row("the same command counting afresh (NANOLLM_ANALYSIS_CACHE=0)", f"{counted[0]:.2f}", f"{counted[1]:.2f}")
    table.add_row("  minus the floor", f"{counted[0] - torch_import[0]:.2f}", f"{counted[1] - torch_import[1]:.2f}")
    table.add_row(f"first analysis in a process (qwen3_0_6b; imported {', '.join(imported) or 'none of ' + ', '.join(HEAVY)})", f"{cold:.2f}", "")
    for name, layers, lower, analysis in rows:
        verdict = f", target 1 s: {'met' if lower + analysis < 1 else 'missed'}" if name in PUBLISHED else ""
        table.add_row(f"{name} ({layers} layers): parse+lower / analysis{verdict}", f"{lower:.3f} / {analysis:.3f}", "")
    Console().print(table)


if __name__ == "__main__":
    main()
