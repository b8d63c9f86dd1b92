"""What Muon's gathering of whole matrices costs under FSDP: the same run with optim=muon and optim=adamw, in turn.

Each repeat trains the same model on the same batches through `python -m lingmao.train hardware=fsdp` (two CPU
processes over gloo by default), once with each optimizer, and reads tokens/s (the median of the logged windows
after the first half of the run) from its metrics.csv; it prints both and their ratio, per repeat and as medians.
The same with DDP (`--strategy ddp`) separates the gathering from Muon's own arithmetic.

    python scripts/bench_fsdp.py                                   # model=small, 2 CPU processes, 3 repeats
    python scripts/bench_fsdp.py --strategy ddp --repeat 3
    python scripts/bench_fsdp.py --accelerator cuda --devices 8 --set model=base data.context_length=512
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tokens_per_second(run_dir: Path) -> float:
    rows = [r for f in run_dir.glob("**/metrics.csv") for r in csv.DictReader(open(f)) if r.get("tokens_per_sec")]
    late = rows[len(rows) // 2:]
    if not late:
        raise SystemExit(f"{run_dir}: no tokens/s logged (did the run fail?)")
    return statistics.median(float(r["tokens_per_sec"]) for r in late)


def run(optim: str, args: argparse.Namespace, out: Path, repeat: int) -> float:
    name = f"{optim}-{repeat}"
    strategy = ["hardware=fsdp"] if args.strategy == "fsdp" else ["hardware=ddp"]
    cmd = [
        sys.executable, "-m", "lingmao.train", *strategy, f"hardware.accelerator={args.accelerator}",
        f"hardware.devices={args.devices}", f"optim={optim}", f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=5", "trainer.val_check_interval=100000", "trainer.limit_val_batches=0",
        "run_test=false", "export=false", "show_samples=false", "night=off", "logger.plots=false",
        "logger.print_config=false", "trainer.enable_progress_bar=false", "auto_resume=false",
        "data=jsonl", f"data.train_file={args.train}", "data.context_length=128", "data.batch_size=8",
        *([] if any(o.startswith("model=") for o in args.set) else ["model=small"]),
        *(["hardware.cpu_threads=1"] if args.accelerator == "cpu" else []),
        f"paths.output_dir={out}", f"run_name={name}", *args.set,
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)}\nfailed:\n{done.stderr[-3000:]}")
    return tokens_per_second(out / "runs" / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", choices=("fsdp", "ddp"), default="fsdp")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--train", default=str(REPO / "lingmao/corpus/poetry_sample/train.jsonl"))
    p.add_argument("--set", nargs="*", default=[], help="more overrides, e.g. model=tiny")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            muon, adamw = run("muon", args, Path(tmp), i), run("adamw", args, Path(tmp), i)
            rows.append((muon, adamw))
            print(f"repeat {i}: muon {muon:,.0f} tokens/s, adamw {adamw:,.0f} tokens/s, "
                  f"muon / adamw {muon / adamw:.3f}", flush=True)
    muon, adamw = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
    ratios = [m / a for m, a in rows]
    print(f"{args.strategy}, {args.devices} x {args.accelerator}, {args.steps} steps: median muon {muon:,.0f}, "
          f"adamw {adamw:,.0f} tokens/s; muon / adamw {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
