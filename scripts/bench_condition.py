"""What conditioning buys: bits per character of held-out poem texts with and without their headers, in one
invocation.

    python scripts/bench_condition.py                       # the default run's settings, 800 steps each
    python scripts/bench_condition.py --steps 300 --set data.batch_size=8
    python scripts/bench_condition.py --exports outputs/runs/data.condition-/export outputs/runs/default/export

Trains two models on the same data for the same number of steps (`lingmao.train.train`, composed as the command
line would, on top of the app's defaults): one without a header and one with `data.condition=[title,author,
keywords]` (`--condition` to change the fields). Then scores the test file's texts, one poem at a time
(`lingmao.scoring.text_bits`): the bits of each text's tokens and its `<eos>` over its characters, the header's
tokens never counted. The conditioned model is scored with its whole header, with each field alone, and with an
empty header (it learned that too: `data.condition_dropout`). Prints one table; the unconditioned model's row
is the baseline, so "with header" minus it is what the header buys, and "empty header" minus it is what
conditioning costs a user who gives none (the header's share of the training tokens is the price at a fixed
budget). `--exports PLAIN CONDITIONED` scores two models already trained instead (e.g. the default run and the
same command with `data.condition=[]`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def train_one(label: str, overrides: list[str], common: list[str], out: Path) -> tuple[Path, float, float | None]:
    """(export folder, wall seconds, test bits/char as the run reports it) of one run."""
    from lingmao.config import compose_config
    from lingmao.train import train

    cfg = compose_config([*common, f"paths.output_dir={out}", f"run_name={label}", *overrides])
    started = time.perf_counter()
    result = train(cfg)
    if result.export_dir is None:
        raise SystemExit(f"{label}: the run wrote no export")
    test = result.test.bits_per_character if result.test is not None else None
    return result.export_dir, time.perf_counter() - started, test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per run")
    parser.add_argument("--condition", default="[title,author,keywords]", help="data.condition of the second model")
    parser.add_argument("--test-file", type=Path, help="JSONL of held-out poems (default: the data's test file)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="overrides for both runs")
    parser.add_argument("--output-dir", type=Path, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--exports", type=Path, nargs=2, metavar=("PLAIN", "CONDITIONED"),
                        help="score these two exports instead of training (no header / with one)")
    args = parser.parse_args(argv)

    from lingmao.config import compose_config, validate
    from lingmao.data import input_files
    from lingmao.data.condition import BODY_MARK
    from lingmao.export import load_model
    from lingmao.scoring import documents_of, text_bits

    common = [
        f"trainer.max_steps={args.steps}", "trainer.max_epochs=-1", "night=off", "show_samples=false",
        "logger.plots=false", "auto_resume=false", f"seed={args.seed}", *args.set,
    ]
    logging.getLogger("lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    test_file = args.test_file or input_files(validate(compose_config(common)).data.test_file, "data.test_file")[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-condition-") as tmp:
        root = args.output_dir or Path(tmp)
        runs = {}
        for label, overrides in (("plain", ["data.condition=[]"]), ("condition", [f"data.condition={args.condition}"])):
            if args.exports:
                runs[label] = (args.exports[0 if label == "plain" else 1], None, None)
                continue
            runs[label] = train_one(label, overrides, common, root)
            print(f"{label}: {runs[label][1]:.0f} s, test {runs[label][2]:.3f} bits/char as the run reports it",
                  flush=True)
        plain = load_model(runs["plain"][0])
        score = text_bits(plain, documents_of(plain, test_file))
        rows.append(("plain (no header)", "-", score))
        cond = load_model(runs["condition"][0])
        fields = list(cond.config["condition"]["fields"])
        for header in ["full", *fields, "none"]:
            name = {"full": "+".join(fields), "none": "empty (<body> only)"}.get(header, f"{header} only")
            documents = documents_of(cond, test_file, header)
            if header == "full":  # header tokens a poem carries: the training-time price of conditioning
                share = sum(len(d) - len(d.partition(BODY_MARK)[2]) for d in documents) / sum(
                    len(d) + 2 for d in documents)
            rows.append((f"condition={args.condition}", name, text_bits(cond, documents)))
    base = rows[0][2].bits_per_char
    trained = (f"exports {args.exports[0]} and {args.exports[1]}" if args.exports
               else f"{args.steps} steps per run; settings: {' '.join(common)}")
    print(f"\n{trained}; test texts: {test_file} ({rows[0][2].documents} poems, {rows[0][2].characters} characters)")
    print("| model | header given | text bits/char (header not counted) | vs plain |")
    print("| --- | --- | --- | --- |")
    for model, header, score in rows:
        print(f"| {model} | {header} | {score.bits_per_char:.3f} | {score.bits_per_char - base:+.3f} |")
    if not args.exports:
        print(f"wall time: plain {runs['plain'][1]:.0f} s, conditioned {runs['condition'][1]:.0f} s")
    print(f"the full header is {share:.1%} of a test poem's tokens (before field dropout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
