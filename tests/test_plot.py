"""`lingmao.plot`: reading metrics.csv (resumed runs, night spans), drawing one run and a sweep."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lingmao import plot

COLUMNS = ["epoch", "lr", "night", "step", "tokens_per_sec", "train/loss", "val/loss", "val/ppl"]


def write_metrics(run_dir: Path, steps: range, night: set[int] = frozenset(), offset: float = 0.0,
                  resumed_from: int | None = None) -> Path:
    """A metrics.csv shaped like the CSV logger's: train rows every 5 steps, a validation row every 20."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for step in steps:
        loss = 8.0 * math.exp(-step / 60) + 2.0 + offset
        rows.append({"epoch": 0, "lr": 1e-3 * min(1.0, (step + 1) / 20), "night": int(step in night), "step": step,
                     "tokens_per_sec": 1000 + step, "train/loss": loss})
        if (step + 1) % 20 == 0:
            rows.append({"epoch": 0, "step": step, "val/loss": loss + 0.1, "val/ppl": math.exp(loss + 0.1)})
    if resumed_from is not None:  # a crash after the last row, resumed from an earlier checkpoint
        rows += [dict(r, tokens_per_sec=7) if "tokens_per_sec" in r else r for r in rows if r["step"] >= resumed_from]
    path = run_dir / "metrics.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def assert_real_png(path: Path, min_size: tuple[int, int] = (800, 500)) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
        assert width >= min_size[0] and height >= min_size[1]
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    non_white = float((pixels.min(axis=1) < 230).mean())
    assert 0.02 < non_white < 0.6, non_white  # axes, lines and text: neither blank nor a solid block
    assert len(np.unique(pixels, axis=0)) > 20  # several colours: lines, shading, text


def test_read_metrics_series_and_night_spans(tmp_path):
    write_metrics(tmp_path / "r", range(4, 100, 5), night=set(range(24, 60)))
    run = plot.read_metrics(tmp_path / "r")
    steps, losses = run.series["train/loss"]
    assert steps == list(range(4, 100, 5)) and len(losses) == len(steps)
    assert run.series["val/loss"][0] == [19, 39, 59, 79, 99]
    assert run.night_spans == [(24, 64)]  # from the first night row to the first day row after it


def test_resumed_run_rows_replace_the_repeated_steps(tmp_path):
    write_metrics(tmp_path / "r", range(4, 100, 5), resumed_from=40)
    run = plot.read_metrics(tmp_path / "r")
    steps = run.series["train/loss"][0]
    assert steps == sorted(set(steps)) == list(range(4, 100, 5))
    assert run.series["val/loss"][0] == [19, 39, 59, 79, 99]
    speed = dict(zip(*run.series["tokens_per_sec"], strict=True))
    assert speed[39] == 1039 and speed[44] == 7  # the resumed rows are the ones kept


@pytest.mark.slow
def test_one_run_draws_a_real_png(tmp_path):
    write_metrics(tmp_path / "run", range(4, 300, 5), night=set(range(100, 180)))
    out = plot.plot_runs([tmp_path / "run"])
    assert out == tmp_path / "run" / "plots" / "training.png"
    assert_real_png(out)


@pytest.mark.slow
def test_sweep_cli_one_figure_with_labels_from_overrides(tmp_path, capsys):
    a = tmp_path / "model-tiny__optim.lr-0.001"
    b = tmp_path / "model-tiny__optim.lr-0.003"
    write_metrics(a, range(4, 200, 5))
    write_metrics(b, range(4, 120, 5), offset=0.5)
    assert plot.run_labels([a, b]) == ["optim.lr-0.001", "optim.lr-0.003"]
    out = tmp_path / "sweep.png"
    assert plot.main([str(a), str(b), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert_real_png(out)


@pytest.mark.slow
def test_a_comparison_goes_under_the_output_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    write_metrics(a, range(4, 50, 5))
    write_metrics(b, range(4, 50, 5), offset=0.5)
    assert plot.main([str(a), str(b), "--output-dir", "mine"]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out.parent == Path("mine") / "plots" and out.name.startswith("compare-")
    assert_real_png(out)
    assert not (tmp_path / "sweep.png").exists()


@pytest.mark.slow
def test_resumes_are_read_from_the_session_column(tmp_path):
    write_metrics(tmp_path / "r", range(5, 60, 5))
    path = tmp_path / "r" / "metrics.csv"
    rows = list(csv.DictReader(open(path)))
    for row in rows:
        row["session"] = "1" if int(row["step"]) <= 30 else "2"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0].keys()])
        writer.writeheader()
        writer.writerows(rows)
    assert plot.read_metrics(path).resumed_at == [30]
    assert_real_png(plot.plot_runs([tmp_path / "r"]))


def test_cli_missing_run_is_one_line_exit_2(tmp_path, capsys):
    assert plot.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "metrics.csv" in err[0]


@pytest.mark.slow
def test_no_validation_yet_still_draws(tmp_path):
    write_metrics(tmp_path / "r", range(4, 15, 5))  # no validation row yet
    assert_real_png(plot.plot_runs([tmp_path / "r"]), min_size=(800, 500))


@pytest.mark.parametrize("names,labels", [
    (["a-1__b-2", "a-1__b-3"], ["b-2", "b-3"]),
    (["default", "x-1"], ["default", "x-1"]),
    (["same", "same2"], ["same", "same2"]),
])
def test_run_labels(names, labels):
    assert plot.run_labels([Path(n) for n in names]) == labels
