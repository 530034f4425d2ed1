"""The sweep's report: loss against compute, isoFLOP profiles with their fitted minimum, power laws L(C) with their
exponents, and a Markdown page embedding the figures (SVG and PNG) above the table."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plan import SweepRun, budget_text
from .results import curve

FIGURES = ("loss_vs_flops", "isoflop", "power_law")
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PowerLaw:
    """L(C) = a C^-exponent fitted by least squares in log-log space, with the exponent's confidence interval."""

    label: str
    a: float
    exponent: float
    stderr: float  # of the exponent
    low: float  # the exponent's CONFIDENCE interval
    high: float
    points: int


@dataclass(frozen=True)
class IsoFlopMinimum:
    """The parabola in log(active parameters) fitted to one file's losses at one budget, and where it bottoms out."""

    label: str
    budget: float
    coefficients: tuple[float, float, float]  # loss = c2 x^2 + c1 x + c0, x = ln(active parameters)
    params: float | None  # None: the parabola opens downwards (no minimum inside the sizes tried)
    loss: float | None


def fit_power_law(label: str, budgets: list[float], losses: list[float]) -> PowerLaw | None:
    """ln L = ln a - exponent ln C over the runs (each seed a point); None with fewer than two budgets."""
    from scipy import stats

    if len(set(budgets)) < 2:
        return None
    fit = stats.linregress([math.log(c) for c in budgets], [math.log(v) for v in losses])
    points = len(budgets)
    stderr = fit.stderr if points > 2 else math.nan
    spread = stats.t.ppf(0.5 + CONFIDENCE / 2, points - 2) * stderr if points > 2 else math.nan
    return PowerLaw(label, math.exp(fit.intercept), -fit.slope, stderr, -fit.slope - spread, -fit.slope + spread, points)


def fit_isoflop(label: str, budget: float, params: list[float], losses: list[float]) -> IsoFlopMinimum | None:
    """A parabola through loss against ln(parameters); None with fewer than three sizes."""
    import numpy as np

    if len(set(params)) < 3:
        return None
    x = np.log(np.asarray(params, dtype=float))
    c2, c1, c0 = np.polyfit(x, np.asarray(losses, dtype=float), 2)
    if c2 <= 0:
        return IsoFlopMinimum(label, budget, (c2, c1, c0), None, None)
    best = -c1 / (2 * c2)
    return IsoFlopMinimum(label, budget, (c2, c1, c0), math.exp(best), c0 - c1 * c1 / (4 * c2))


def finite(value: Any) -> bool:
    """Whether a JSON figure is a finite number."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def finished(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with a final held-out loss."""
    return [r for r in rows if finite(r.get("final_loss"))]


def best_size_losses(rows: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Per file: (budgets, losses) of every seed at the size whose mean loss is lowest at that budget."""
    by_size: dict[tuple[str, float, int], list[float]] = defaultdict(list)
    for r in finished(rows):
        by_size[(r["file"], r["budget"], r["size"])].append(r["final_loss"])
    best: dict[tuple[str, float], list[float]] = {}
    for (label, budget, _), losses in by_size.items():
        if (label, budget) not in best or statistics.mean(losses) < statistics.mean(best[(label, budget)]):
            best[(label, budget)] = losses
    points: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for (label, budget), losses in sorted(best.items()):
        points[label][0].extend([budget] * len(losses))
        points[label][1].extend(losses)
    return dict(points)


def fits(rows: list[dict[str, Any]]) -> tuple[list[PowerLaw], list[IsoFlopMinimum]]:
    """Every file's power law, and every (file, budget) isoFLOP minimum the sizes allow."""
    laws = [law for label, (budgets, losses) in best_size_losses(rows).items() if (law := fit_power_law(label, budgets, losses))]
    groups: dict[tuple[str, float], tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for r in finished(rows):
        groups[(r["file"], r["budget"])][0].append(r["active_params"])
        groups[(r["file"], r["budget"])][1].append(r["final_loss"])
    minima = [m for (label, budget), (params, losses) in sorted(groups.items()) if (m := fit_isoflop(label, budget, params, losses))]
    return laws, minima


def colours(labels: list[str]) -> dict[str, Any]:
    """One colour per file, in the order given."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    return {label: palette(i % 10) for i, label in enumerate(labels)}


def save(figure: Any, out: Path, name: str) -> None:
    """name.svg and name.png, with no date or random ids (the same sweep draws the same files)."""
    figure.tight_layout()
    figure.savefig(out / f"{name}.svg", metadata={"Date": None})
    figure.savefig(out / f"{name}.png", dpi=110, metadata={"Software": None})


def plot_curves(rows: list[dict[str, Any]], runs: list[SweepRun], palette: dict[str, Any], out: Path) -> None:
    """Held-out loss against training FLOPs: a line per (file, budget, size), the mean over seeds, the seeds' range shaded."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    groups: dict[tuple[str, float, int], list[list[tuple[float, float]]]] = defaultdict(list)
    for run in runs:
        points = curve(run.run_dir)
        if points:
            groups[(run.entry.label, run.budget, run.size)].append(points)
    labelled: set[str] = set()
    for (label, _, _), seeds in groups.items():
        length = min(len(points) for points in seeds)
        flops = [seeds[0][i][0] for i in range(length)]
        losses = [[points[i][1] for points in seeds] for i in range(length)]
        axes.plot(flops, [statistics.mean(v) for v in losses], "-o", markersize=3, color=palette[label], label=None if label in labelled else label)
        if len(seeds) > 1:
            axes.fill_between(flops, [min(v) for v in losses], [max(v) for v in losses], color=palette[label], alpha=0.2, linewidth=0)
        labelled.add(label)
    axes.set_xscale("log")
    axes.set_xlabel("training FLOPs")
    axes.set_ylabel("held-out loss (nats/token)")
    axes.set_title("held-out loss against compute (mean over seeds; shaded: their range)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    save(figure, out, "loss_vs_flops")
    plt.close(figure)


def plot_isoflop(rows: list[dict[str, Any]], minima: list[IsoFlopMinimum], palette: dict[str, Any], out: Path) -> None:
    """Final loss against active parameters, a panel per budget, with each file's fitted parabola and its minimum."""
    import matplotlib.pyplot as plt
    import numpy as np

    done = finished(rows)
    budgets = sorted({r["budget"] for r in done}) or [0.0]
    figure, panels = plt.subplots(1, len(budgets), figsize=(4 * len(budgets), 4), squeeze=False)
    for panel, budget in zip(panels[0], budgets):
        for label, colour in palette.items():
            points = [(r["active_params"], r["final_loss"]) for r in done if r["file"] == label and r["budget"] == budget]
            if points:
                panel.scatter(*zip(*points), color=colour, s=14, label=label)
        for m in minima:
            if m.budget != budget:
                continue
            sizes = [r["active_params"] for r in done if r["file"] == m.label and r["budget"] == budget]
            x = np.linspace(math.log(min(sizes)), math.log(max(sizes)), 50)
            panel.plot(np.exp(x), np.polyval(m.coefficients, x), color=palette[m.label], linewidth=1)
            if m.params is not None:
                panel.plot([m.params], [m.loss], "*", color=palette[m.label], markersize=12)
        panel.set_xscale("log")
        panel.set_xlabel("active parameters")
        panel.set_title(f"C = {budget:.3g} FLOPs")
        panel.grid(True, which="both", alpha=0.3)
    panels[0][0].set_ylabel("final held-out loss")
    panels[0][0].legend(fontsize=7)
    save(figure, out, "isoflop")
    plt.close(figure)


def plot_power_laws(rows: list[dict[str, Any]], laws: list[PowerLaw], palette: dict[str, Any], out: Path) -> None:
    """Final loss (best size per budget, every seed) against the budget, and each file's fitted L(C) = a C^-exponent."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    figure, axes = plt.subplots(figsize=(8, 5))
    points = best_size_losses(rows)
    fitted = {law.label: law for law in laws}
    for label, (budgets, losses) in points.items():
        axes.scatter(budgets, losses, color=palette[label], s=16)
        law = fitted.get(label)
        if law is not None:
            c = np.geomspace(min(budgets), max(budgets), 50)
            axes.plot(c, law.a * c**-law.exponent, color=palette[label],
                      label=f"{label}: L = {law.a:.3g} C^-{law.exponent:.3f} ({CONFIDENCE:.0%}: {law.low:.3f}..{law.high:.3f})")
        else:
            axes.plot([], [], color=palette[label], label=f"{label} (one budget: no fit)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 6.5, not 6.5 x 10^0
    axes.yaxis.set_major_formatter(plain)
    axes.yaxis.set_minor_formatter(plain)
    axes.set_xlabel("training FLOPs (budget)")
    axes.set_ylabel("final held-out loss")
    axes.set_title("power laws L(C), fitted over every seed at each budget's best size")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    save(figure, out, "power_law")
    plt.close(figure)


def cell(value: Any, digits: int = 4) -> str:
    """A table cell."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def paired_differences(rows: list[dict[str, Any]]) -> list[str]:
    """Each file's final loss minus the first file's, seed by seed (a seed fixes the data order, which weighs at small
    budgets), at the law's size: mean and standard error of the differences."""
    done = [r for r in finished(rows) if r["size"] == 0]
    labels = list(dict.fromkeys(r["file"] for r in rows))
    if len(labels) < 2:
        return []
    loss = {(r["file"], r["budget"], r["seed"]): r["final_loss"] for r in done}
    lines = ["", f"## Against {labels[0]}, paired by seed", "",
             "Final loss minus the first file's at the same budget and seed: mean ± standard error over seeds (negative: lower loss).", "",
             "| file | " + " | ".join(budget_text(b) for b in sorted({r["budget"] for r in done})) + " |", "|---|" + "---|" * len({r["budget"] for r in done})]
    for label in labels[1:]:
        cells = []
        for budget in sorted({r["budget"] for r in done}):
            diffs = [loss[(label, budget, seed)] - loss[(labels[0], budget, seed)] for seed in sorted({r["seed"] for r in done})
                     if (label, budget, seed) in loss and (labels[0], budget, seed) in loss]
            error = f" ± {statistics.stdev(diffs) / math.sqrt(len(diffs)):.3f}" if len(diffs) > 1 else ""
            cells.append(f"{statistics.mean(diffs):+.3f}{error}" if diffs else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict[str, Any]], laws: list[PowerLaw], minima: list[IsoFlopMinimum], columns: list[str]) -> str:
    """The report page: summary by file and budget, fits, figures, every run."""
    summary = (f"{len(rows)} runs; {len(finished(rows))} with a final evaluation. Figures: held-out loss of the final checkpoint "
               "(nats/token) on the run's held-out set; mean ± sample standard deviation over seeds.")
    lines = ["# Sweep report", "", summary, ""]
    by_cell: dict[tuple[str, float, int], list[dict[str, Any]]] = defaultdict(list)
    for r in finished(rows):
        by_cell[(r["file"], r["budget"], r["size"])].append(r)
    lines += ["| file | budget | size | active params | tokens | seeds | final loss | bits/byte |", "|---|---|---|---|---|---|---|---|"]
    for (label, budget, size), group in sorted(by_cell.items(), key=lambda item: (item[0][1], item[0][0], item[0][2])):
        losses = [r["final_loss"] for r in group]
        spread = f" ± {statistics.stdev(losses):.3f}" if len(losses) > 1 else ""
        bpb = statistics.mean(r["bits_per_byte"] for r in group)
        lines.append(f"| {label} | {budget_text(budget)} | {size:+d} | {group[0]['active_params']:,} | {group[0]['tokens']:,} | {len(group)} | "
                     f"{statistics.mean(losses):.4f}{spread} | {bpb:.4f} |")
    lines += paired_differences(rows)
    lines += ["", "## Power laws L(C) = a C^-exponent", ""]
    if laws:
        lines += ["| file | a | exponent | standard error | 95% interval | points |", "|---|---|---|---|---|---|"]
        lines += [f"| {law.label} | {law.a:.4g} | {law.exponent:.4f} | {cell(law.stderr)} | {cell(law.low)}..{cell(law.high)} | {law.points} |" for law in laws]
    else:
        lines.append("No fit: a file needs finished runs at two budgets or more.")
    lines += ["", "## IsoFLOP minima", ""]
    if minima:
        lines += ["| file | budget | optimal active params | loss there |", "|---|---|---|---|"]
        lines += [f"| {m.label} | {budget_text(m.budget)} | {cell(m.params)} | {cell(m.loss)} |" for m in minima]
    else:
        lines.append("No fit: a budget needs three model sizes or more (`--sizes 3`).")
    lines += ["", "## Figures", ""]
    for name in FIGURES:
        lines += [f"![{name}]({name}.svg)", ""]
    lines += ["## Every run", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict[str, Any]], runs: list[SweepRun], columns: list[str], out: Path) -> None:
    """The three figures (SVG and PNG) and report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "nanollm-sweep"  # stable ids in the SVG
    palette = colours(list(dict.fromkeys(run.entry.label for run in runs)))
    laws, minima = fits(rows)
    plot_curves(rows, runs, palette, out)
    plot_isoflop(rows, minima, palette, out)
    plot_power_laws(rows, laws, palette, out)
    (out / "report.md").write_text(markdown(rows, laws, minima, columns), encoding="utf-8")
