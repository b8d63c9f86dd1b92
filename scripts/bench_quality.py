"""Quality per training budget: several recipes trained by lingmao itself on the same data and the same number
of tokens, side by side, in one invocation.

    python scripts/bench_quality.py                          # the four recipes below, 800 steps of 16 x 128
    python scripts/bench_quality.py --steps 400 --repeat 2   # each recipe twice, in rotated order
    python scripts/bench_quality.py --recipe "default=" --recipe "adamw-3e-3=optim=adamw,optim.lr=3e-3"

A recipe is `label=override,override,...` on top of the app's defaults (conf/train.yaml) and the common
settings below (`--set` adds more). Each run is `lingmao.train.train` on a config composed as the command line
would, validated every `--val-every` steps and tested at the end. Prints per recipe: test bits per character
(the held-out test file), the last validation loss and bits per character, wall time, and how many steps
the first recipe needed to reach each other recipe's final validation bits per character.

Bits per character, not loss, compare recipes: a recipe that converts the text (data.convert) has another
vocabulary, so its loss per token is on another scale.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RECIPES = (
    "default=",
    "gpt-adamw=optim=adamw",
    "design-t2s=model=design,optim=adamw",
    "design=model=design,optim=adamw,data.convert=none",
)


@dataclass
class Outcome:
    test_bpc: float
    val_loss: float
    val_bpc: float
    seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val/bpc)


def parse_recipe(text: str) -> tuple[str, list[str]]:
    label, _, rest = text.partition("=")
    if not label:
        raise SystemExit(f"--recipe {text!r}: expected label=override,override,...")
    return label, [o for o in rest.split(",") if o]


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val/bpc) rows of the run's metrics.csv (the latest logger version)."""
    files = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    rows = []
    with files[-1].open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("val/bpc") and row.get("step"):
                rows.append((int(float(row["step"])), float(row["val/bpc"])))
    return rows


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which `curve` is at or below `target`, interpolated between validations."""
    previous = None
    for step, value in curve:
        if value <= target:
            if previous is None or previous[1] == value:
                return float(step)
            (s0, v0) = previous
            return s0 + (step - s0) * (v0 - target) / (v0 - value)
        previous = (step, value)
    return None


def run_recipe(label: str, overrides: list[str], common: list[str], out: Path) -> Outcome:
    from lingmao.config import compose_config
    from lingmao.train import train

    cfg = compose_config([*common, f"paths.output_dir={out}", f"run_name={label}", *overrides])
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    curve = val_curve(result.run_dir)
    if result.test is None or result.test.bits_per_character is None or not curve:
        raise SystemExit(f"{label}: the run left no test or validation figures in {result.run_dir}")
    return Outcome(result.test.bits_per_character, result.last_val_loss or math.nan, curve[-1][1], seconds, curve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", help="label=override,... (repeatable; default: four recipes)")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per run")
    parser.add_argument("--val-every", type=int, default=50, help="validate every N steps")
    parser.add_argument("--repeat", type=int, default=1, help="runs per recipe, the order rotated each time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every recipe")
    parser.add_argument("--output-dir", type=Path, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args(argv)

    recipes = [parse_recipe(r) for r in (args.recipe or RECIPES)]
    common = [
        f"trainer.max_steps={args.steps}", "trainer.max_epochs=-1", f"trainer.val_check_interval={args.val_every}",
        "night=off", "export=false", "show_samples=false", "logger.plots=false", "auto_resume=false",
        *args.set,
    ]
    logging.getLogger("lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    results: dict[str, list[Outcome]] = {label: [] for label, _ in recipes}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        root = args.output_dir or Path(tmp)
        for r in range(args.repeat):
            order = recipes[r % len(recipes):] + recipes[: r % len(recipes)]
            for label, overrides in order:
                seed = [f"seed={args.seed + r}"]
                outcome = run_recipe(label, overrides + seed, common, root / f"repeat-{r}")
                results[label].append(outcome)
                print(f"repeat {r} {label}: test {outcome.test_bpc:.3f} bits/char, val {outcome.val_bpc:.3f} "
                      f"bits/char, {outcome.seconds:.0f} s", flush=True)

    print(f"\n{args.steps} steps per run; settings: {' '.join(common)}")
    print("| recipe | overrides | test bits/char | val loss | val bits/char | wall time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, overrides in recipes:
        rows = results[label]

        def median(values: list[float]) -> str:
            middle = statistics.median(values)
            return f"{middle:.3f}" if len(values) == 1 else f"{middle:.3f} ({min(values):.3f}-{max(values):.3f})"

        print(f"| {label} | {' '.join(overrides) or '(defaults)'} | {median([o.test_bpc for o in rows])} | "
              f"{median([o.val_loss for o in rows])} | {median([o.val_bpc for o in rows])} | "
              f"{statistics.median(o.seconds for o in rows):.0f} s |")
    first, _ = recipes[0]
    for label, _ in recipes[1:]:
        target = statistics.median(o.val_bpc for o in results[label])
        needed = [steps_to_reach(o.curve, target) for o in results[first]]
        if all(n is not None for n in needed):
            steps = statistics.median(needed)
            print(f"STEPS {first} needs {steps:.0f} of {args.steps} steps ({steps / args.steps:.0%}) to reach "
                  f"{label}'s final validation {target:.3f} bits/char")
        else:
            print(f"STEPS {first} does not reach {label}'s final validation {target:.3f} bits/char in {args.steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
