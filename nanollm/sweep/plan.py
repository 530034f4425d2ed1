"""The runs of a sweep: every file sized to every budget (and to neighbouring sizes for isoFLOP profiles), every seed."""
from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..budget import Solution, solve
from ..errors import NanollmError

SIZE_STEP = 2.0  # isoFLOP sizes: active parameters this factor apart around the law's choice


@dataclass(frozen=True)
class Entry:
    """One thing a sweep compares: an .arch file, optionally with a recipe of its own (`FILE.arch@RECIPE.yaml`)."""

    label: str
    arch: Path
    recipe: Path | None


@dataclass(frozen=True)
class SweepRun:
    """One training run of a sweep."""

    entry: Entry
    budget: float
    size: int  # 0: the law's choice; -1, +1, ...: the isoFLOP neighbours, by parameters
    seed: int
    solution: Solution = field(compare=False, repr=False)
    out: Path = field(compare=False)

    @property
    def name(self) -> str:
        """The run directory's name: label, budget, size and seed."""
        size = "" if self.size == 0 else f"-size{self.size:+d}"
        return f"{self.entry.label}-C{budget_text(self.budget)}{size}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.out / "runs" / self.name

    @property
    def arch_path(self) -> Path:
        """The sized model, written as a standalone .arch file shared by the run's seeds."""
        size = "" if self.size == 0 else f"-size{self.size:+d}"
        return self.out / "archs" / f"{self.entry.label}-C{budget_text(self.budget)}{size}.arch"

    def train_args(self, recipe: Path | None, overrides: dict[str, Any]) -> list[str]:
        """`nanollm train` arguments of this run (a new run; `--resume` replaces --recipe, --out and the settings)."""
        args = [str(self.arch_path)]
        if recipe is not None:
            args += ["--recipe", str(recipe)]
        for name, value in overrides.items():
            args += flag(name, value)
        return args + ["--budget", f"{self.budget:.6g}", "--seed", str(self.seed), "--out", str(self.run_dir)]


def budget_text(budget: float) -> str:
    """1e13 -> '1e13', 3e12 -> '3e12', 2.5e14 -> '2.5e14'."""
    mantissa, exponent = f"{budget:.3g}".split("e") if "e" in f"{budget:.3g}" else (f"{budget:.3g}", "0")
    return f"{mantissa}e{int(exponent)}"


def flag(name: str, value: Any) -> list[str]:
    """A recipe override as `nanollm train` flags."""
    option = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [option if value else "--no-" + name.replace("_", "-")]
    return [option, "null" if value is None else str(value)]


def parse_entry(text: str, taken: set[str]) -> Entry:
    """`FILE.arch` or `FILE.arch@RECIPE.yaml`, labelled by the file's stem (and the recipe's), unique in the sweep."""
    arch_text, _, recipe_text = text.partition("@")
    arch, recipe = Path(arch_text), Path(recipe_text) if recipe_text else None
    if not arch.is_file():
        raise NanollmError(f"sweep: no such .arch file: {arch}")
    if recipe is not None and not recipe.is_file():
        raise NanollmError(f"sweep: no such recipe: {recipe}")
    label = arch.stem + (f"+{recipe.stem}" if recipe else "")
    if label in taken:
        raise NanollmError(f"sweep: {text} is given twice (label {label})")
    taken.add(label)
    return Entry(label, arch, recipe)


def size_offsets(sizes: int) -> list[int]:
    """Offsets around the law's choice: 1 -> [0], 3 -> [-1, 0, 1], 4 -> [-2, -1, 0, 1]."""
    return [k - sizes // 2 for k in range(sizes)]


def plan_sweep(texts: list[str], budgets: list[float], seeds: int, sizes: int, law: str | None, seq_len: int | None, out: Path) -> list[SweepRun]:
    """Every run of the sweep, each model sized (and written to DIR/archs/) once for all its seeds."""
    taken: set[str] = set()
    entries = [parse_entry(text, taken) for text in texts]
    runs = []
    (out / "archs").mkdir(parents=True, exist_ok=True)
    for entry in entries:
        for budget in budgets:
            chosen = solve(entry.arch, budget, law=law, seq_len=seq_len)
            seen: set[tuple[int, ...]] = set()
            for offset in size_offsets(sizes):
                solution = chosen if offset == 0 else solve(entry.arch, budget, params=round(chosen.analysis.params_active * SIZE_STEP**offset), seq_len=seq_len)
                shape = tuple(solution.solved_settings().values())
                if shape in seen:  # the family has no distinct size there (too small, or widths too far apart)
                    continue
                seen.add(shape)
                template = SweepRun(entry, budget, offset, 0, solution, out)
                if not template.arch_path.exists() or template.arch_path.read_text(encoding="utf-8") != solution.text:
                    template.arch_path.write_text(solution.text, encoding="utf-8")
                runs += [SweepRun(entry, budget, offset, seed, solution, out) for seed in range(seeds)]
    return runs


def check_spec(out: Path, spec: dict[str, Any]) -> None:
    """DIR/sweep.json: written by the first run of a sweep; a rerun into DIR must train its runs as they were trained."""
    path = out / "sweep.json"
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        fixed = ("law", "recipe", "overrides", "seq_len")
        changed = [name for name in fixed if previous.get(name) != spec.get(name)]
        if changed:
            raise NanollmError(f"sweep: {out} holds a sweep with other {', '.join(changed)} ({', '.join(f'{n}={previous.get(n)!r}' for n in changed)}): "
                               f"give the same settings to continue it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=2), encoding="utf-8")


def launch_commands(runs: list[SweepRun], recipe: Path | None, overrides: dict[str, Any]) -> list[str]:
    """One `accelerate launch` command per run, for a cluster's job scripts."""
    return [shlex.join(["accelerate", "launch", "-m", "nanollm", "train", *run.train_args(run.entry.recipe or recipe, overrides)]) for run in runs]


def python_command() -> list[str]:
    """How a run is started here: this Python running nanollm's module."""
    return [sys.executable, "-m", "nanollm", "train"]
