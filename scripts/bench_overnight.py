"""Which model size makes the best night: `experiment=overnight` at several sizes, side by side at night settings,
each on a core of its own, compared at equal wall-clock time and extrapolated to the night.

    python scripts/bench_overnight.py --sizes 4x256 6x384 --steps 22000 8500 --minutes 30 \\
        data.train_file=data/poetry_full/train data.val_file=data/poetry_full/val data.test_file=data/poetry_full/test
    python scripts/bench_overnight.py --runs outputs/runs/size-4x256 outputs/runs/size-6x384   # runs already made

Each size (LAYERSxWIDTH: heads of 64, MLP 4 x width) runs `python -m lingmao.train experiment=overnight` with the
night settings forced (`night.now=23:00`: one thread, batch 8, learning rates x 0.75), pinned to one CPU core (so
two sizes run at once on a 2-core machine under the same conditions), with `trainer.max_steps` the steps one
night allows that size (`--steps`; default: 22,000 scaled by the training FLOPs per token against `model=small`),
and is stopped by SIGTERM after `--minutes` (it saves a checkpoint; the same command resumes it). Extra arguments
are overrides for every run.

The table gives, per size, its parameters, the steps it reached and its throughput, then its training loss (nats
per token, the mean of the logged steps in the five minutes before) at equal times of training (a step's time from the
run's median throughput, so that a moment when something else held the core does not count against a size;
validation and checkpoints left out). Every step reads new text (the night is less than one epoch), so the
training loss measures what the model does on text it has not seen. Last, a power law with a floor fitted to each
curve, L(step) = a + b * step^-c, read at the night's steps (9 hours at the measured throughput): an extrapolation
from the first minutes of a nine-hour run, which says which way the sizes are heading, not what the night gives.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from lingmao.plot import read_metrics

ROOT = Path(__file__).resolve().parent.parent
NIGHT_HOURS = 9  # 22:00 to 07:00
SMALL_STEPS = 22000  # conf/experiment/overnight.yaml: model=small for one night


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["4x256", "6x384"], help="LAYERSxWIDTH (default: 4x256 6x384)")
    p.add_argument("--steps", nargs="+", type=int, help="trainer.max_steps per size (default: from FLOPs)")
    p.add_argument("--minutes", type=float, default=30, help="wall-clock minutes per run (default: 30)")
    p.add_argument("--runs", nargs="+", type=Path, help="compare these run folders instead of training")
    p.add_argument("--runs-dir", type=Path, default=Path("outputs/runs"), help="where the runs go")
    p.add_argument("overrides", nargs="*", help="overrides for every run, e.g. data.train_file=...")
    return p.parse_args(argv)


def size_dims(size: str) -> dict[str, int]:
    """The model keys of LAYERSxWIDTH: heads of 64, an MLP of 4 x width."""
    layers, width = (int(x) for x in size.lower().split("x"))
    return {"num_layers": layers, "d_model": width, "nhead": max(1, width // 64), "dim_feedforward": 4 * width}


def night_steps(size: str, vocab_size: int = 13_600, context: int = 256) -> int:
    """22,000 steps (a night of `model=small`) scaled by the training FLOPs per token of `size` against small."""
    import dataclasses

    from lingmao.model import ModelConfig, train_flops_per_token

    small = ModelConfig.of_size("small")
    other = dataclasses.replace(small, **size_dims(size))
    ratio = train_flops_per_token(small, vocab_size, context) / train_flops_per_token(other, vocab_size, context)
    return int(round(SMALL_STEPS * ratio, -2))


def train(args: argparse.Namespace) -> list[Path]:
    steps = args.steps or [night_steps(s) for s in args.sizes]
    cores = sorted(os.sched_getaffinity(0))
    if len(args.sizes) > len(cores):
        sys.exit(f"{len(args.sizes)} sizes but {len(cores)} cores: one core per size")
    args.runs_dir.mkdir(parents=True, exist_ok=True)  # the runs' logs go beside it
    processes = []
    for size, max_steps, core in zip(args.sizes, steps, cores, strict=False):
        command = [sys.executable, "-m", "lingmao.train", "experiment=overnight", f"run_name=size-{size}",
                   "night.now=23:00", f"trainer.max_steps={max_steps}",
                   *(f"model.{key}={value}" for key, value in size_dims(size).items()), *args.overrides]
        print(f"core {core}: {' '.join(command[1:])}", flush=True)
        log = open(args.runs_dir.parent / f"size-{size}.log", "w")  # noqa: SIM115 (closed with the process)
        processes.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                           preexec_fn=lambda c=core: os.sched_setaffinity(0, {c})), log))
    time.sleep(args.minutes * 60)
    for process, _ in processes:
        process.send_signal(signal.SIGTERM)
    for process, log in processes:
        process.wait()
        log.close()
    return [args.runs_dir / f"size-{size}" for size in args.sizes]


def fit_power_law(steps: np.ndarray, loss: np.ndarray) -> tuple[float, float, float]:
    """a, b, c of loss = a + b * steps^-c (least squares in log space over a grid of floors a)."""
    best = (float("inf"), 0.0, 0.0, 0.0)
    for a in np.linspace(0, loss.min() - 1e-3, 400):
        slope, intercept = np.polyfit(np.log(steps), np.log(loss - a), 1)
        error = float(np.sum((a + np.exp(intercept) * steps**slope - loss) ** 2))
        if error < best[0]:
            best = (error, float(a), float(np.exp(intercept)), float(-slope))
    return best[1], best[2], best[3]


def compare(run_dirs: list[Path]) -> None:
    rows = []
    for run_dir in run_dirs:
        metrics = read_metrics(run_dir)
        steps, loss = (np.array(x, dtype=float) for x in metrics.series["train/loss"])
        tok_steps, tok_per_s = (np.array(x, dtype=float) for x in metrics.series["tokens_per_sec"])
        config = OmegaConf.load(run_dir / "config.yaml")
        batch = config.data.batch_size * config.night.batch_size_factor  # every step of these runs is at night
        tokens_per_step = int(batch) * config.data.context_length * config.optim.accumulation_steps
        speed = float(np.median(tok_per_s))
        at = steps * tokens_per_step / speed  # seconds of training at its median throughput
        rows.append((run_dir.name, steps, loss, at, speed, tokens_per_step))
    width = max(len(r[0]) for r in rows) + 2
    marks = [m for m in (10, 20, 30, 40, 50, 60, 90, 120) if all(r[3][-1] >= m * 60 for r in rows)]
    print(f"{'run':<{width}}{'steps':>7}{'tok/s':>7}" + "".join(f"{f'{m} min':>9}" for m in marks)
          + f"{'night steps':>13}{'fit at night':>14}")
    for name, steps, loss, at, speed, tokens_per_step in rows:
        cells = []
        for m in marks:
            window = (at > (m - 5) * 60) & (at <= m * 60)
            cells.append(f"{loss[window].mean():>9.3f}")
        night = int(NIGHT_HOURS * 3600 * speed / tokens_per_step)
        use = steps >= 300  # after the warm-up
        fitted = "-"
        if use.sum() >= 10:
            a, b, c = fit_power_law(steps[use], loss[use])
            fitted = f"{a + b * night**-c:.3f}"
        print(f"{name:<{width}}{int(steps[-1]):>7}{speed:>7.0f}" + "".join(cells) + f"{night:>13,}{fitted:>14}")
    print("training loss: nats per token, the mean over the 5 minutes before each time (a step's time at the run's "
          "median tokens/s); fit: a + b * step^-c from step 300 on, read at the steps of 9 hours at that speed")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dirs = args.runs or train(args)
    compare(run_dirs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
