"""Training plots from `metrics.csv`: `python -m lingmao.plot RUN_DIR [RUN_DIR ...] [-o out.png]`.

One run: loss (train and validation), validation perplexity, learning rate and tokens/s against the
optimizer step, night-mode periods shaded; written to `RUN_DIR/plots/training.png`. Several runs (a
sweep): the same panels with one colour per run and a legend made of the overrides that differ.
matplotlib's Agg canvas is used directly, so no display is needed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lingmao.errors import LingmaoError
from lingmao.io import read_text_file

log = logging.getLogger(__name__)

PLOT_NAME = "plots/training.png"
# (panel title, [(column, label, style)], log scale)
PANELS: list[tuple[str, list[tuple[str, str, str]], bool]] = [
    ("loss", [("train/loss", "train", "-"), ("val/loss", "validation", "o-")], False),
    ("validation perplexity", [("val/ppl", "validation", "o-")], True),
    ("learning rate", [("lr", "lr", "-"), ("lr/muon", "lr (Muon)", "-")], False),
    ("tokens / s", [("tokens_per_sec", "tokens/s", "-")], False),
]


@dataclass
class RunMetrics:
    """The columns of one metrics.csv as (steps, values) series, plus the night-mode spans."""

    name: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    night_spans: list[tuple[int, int]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)  # steps where a later session took over


def _rows_without_repeats(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """A resumed run appends rows again from its checkpoint's step; keep the later copy of the repeated steps."""
    kept: list[dict[str, str]] = []
    top = -1
    for row in rows:
        try:
            step = int(float(row.get("step") or ""))
        except ValueError:
            continue
        if step < top:
            kept = [r for r in kept if int(float(r["step"])) < step]
        kept.append(row)
        top = step
    return kept


def read_metrics(path: str | Path, name: str | None = None) -> RunMetrics:
    """Read a metrics.csv (or the run directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.csv"
    if not path.exists():
        raise LingmaoError(f"{path}: no metrics.csv (is this a run directory?)")
    text = read_text_file(path)  # a directory, unreadable, empty, binary, not UTF-8: one line
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if "step" not in (reader.fieldnames or []):
        raise LingmaoError(f"{path}: not a metrics.csv written by lingmao (no 'step' column)")
    rows = _rows_without_repeats(list(reader))
    run = RunMetrics(name or path.parent.name)
    for row in rows:
        step = int(float(row["step"]))
        for key, text in row.items():
            if key == "step" or text in (None, ""):
                continue
            try:
                value = float(text)
            except ValueError:
                continue
            steps, values = run.series.setdefault(key, ([], []))
            steps.append(step)
            values.append(value)
    run.night_spans = _spans(*run.series.get("night", ([], [])))
    steps, sessions = run.series.get("session", ([], []))
    run.resumed_at = [steps[i - 1] for i in range(1, len(sessions)) if sessions[i] != sessions[i - 1]]
    return run


def _spans(steps: list[int], flags: list[float]) -> list[tuple[int, int]]:
    """Contiguous step ranges where the flag is 1."""
    spans: list[tuple[int, int]] = []
    start: int | None = None
    prev = 0
    for step, flag in sorted(zip(steps, flags, strict=True)):
        if flag >= 0.5 and start is None:
            start = step
        elif flag < 0.5 and start is not None:
            spans.append((start, step))
            start = None
        prev = step
    if start is not None:
        spans.append((start, prev))
    return spans


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Legend labels: the parts of the run names (overrides `a-1__b-2`, see lingmao.names) that differ."""
    parts = [d.name.split("__") for d in run_dirs]
    common = set.intersection(*(set(p) for p in parts)) if parts else set()
    labels = [" ".join(x for x in p if x not in common) or d.name for p, d in zip(parts, run_dirs, strict=True)]
    return labels


def _spread(runs: list[RunMetrics], columns: list[tuple[str, str, str]]) -> float:
    """max / min of the positive values of these columns over all runs."""
    values = [v for run in runs for c, _, _ in columns for v in run.series.get(c, ([], []))[1] if v > 0]
    return max(values) / min(values) if values else 1.0


def _plain_number(value: float, _pos: int) -> str:
    return f"{value:g}"


def _minor_number(value: float, _pos: int) -> str:
    """Label only the 2s and 5s between powers of ten, so a log axis stays readable."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if round(mantissa, 6) in (2.0, 5.0) else ""


def draw(runs: list[RunMetrics], out: str | Path, title: str | None = None) -> Path:
    """Draw the four panels for one or more runs into a PNG at `out`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    out = Path(out)
    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    several = len(runs) > 1
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (panel, columns, log_scale) in zip(axes, PANELS, strict=True):
        drawn = False
        for run, colour in zip(runs, colours, strict=True):
            for column, label, style in columns:
                if column not in run.series:
                    continue
                steps, values = run.series[column]
                if several:
                    # one colour per run; validation dashed with markers, training solid
                    label = f"{run.name} ({label})" if len(columns) > 1 else run.name
                    kwargs: dict[str, Any] = {"color": colour}
                else:
                    kwargs = {}
                marker = "o" if "o" in style else None
                ax.plot(steps, values, linestyle="--" if several and marker else "-", marker=marker,
                        markersize=3, linewidth=1.2, label=label, **kwargs)
                drawn = True
        if log_scale and drawn and _spread(runs, columns) > 10:  # within a decade a linear axis reads better
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(_plain_number))
            ax.yaxis.set_minor_formatter(FuncFormatter(_minor_number))
        for run, colour in zip(runs, colours, strict=True):
            for a, b in run.night_spans:
                ax.axvspan(a, b, color="tab:blue", alpha=0.08, linewidth=0)
            for step in run.resumed_at:
                ax.axvline(step, color=colour if several else "grey", linestyle=":", linewidth=1)
        ax.set_title(panel)
        ax.grid(True, alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif several or len(columns) > 1:
            ax.legend(fontsize=8)
    for ax in axes[2:]:
        ax.set_xlabel("optimizer step")
    notes = (["shaded: night mode"] if any(run.night_spans for run in runs) else []) + (
        ["dotted: resumed"] if any(run.resumed_at for run in runs) else [])
    heading = title or (runs[0].name if len(runs) == 1 else f"{len(runs)} runs")
    fig.suptitle(heading + (f"   ({'; '.join(notes)})" if notes else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(out)  # a viewer never sees a half-written file
    return out


def plot_runs(run_dirs: list[str | Path], out: str | Path | None = None, output_dir: str | Path = "outputs") -> Path:
    """Draw one run into its own plots/training.png, or several runs into one figure (by default
    `<output_dir>/plots/compare-<hash of the run directories>.png`)."""
    dirs = [Path(d) for d in run_dirs]
    labels = run_labels(dirs) if len(dirs) > 1 else [dirs[0].name]
    runs = [read_metrics(d, label) for d, label in zip(dirs, labels, strict=True)]
    if out is None:
        digest = hashlib.sha256("\n".join(sorted(str(d.resolve()) for d in dirs)).encode()).hexdigest()[:8]
        out = dirs[0] / PLOT_NAME if len(dirs) == 1 else Path(output_dir) / "plots" / f"compare-{digest}.png"
    return draw(runs, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingmao.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories (each holds a metrics.csv)")
    parser.add_argument("-o", "--output", help="PNG to write (default: RUN_DIR/plots/training.png for one run, "
                                               "OUTPUT_DIR/plots/compare-<hash>.png for several)")
    parser.add_argument("--output-dir", default="outputs", help="where comparisons go (default: outputs)")
    args = parser.parse_args(argv)
    try:
        path = plot_runs(args.run_dirs, args.output, args.output_dir)
    except (LingmaoError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
