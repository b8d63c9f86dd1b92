"""Fine-tuning on one poet: held-out bits per character of that poet's poems for the base model, the base model
fine-tuned on the poet (`init_from`), and a model trained from scratch on the poet alone, in one invocation.

    python scripts/bench_finetune.py --poet 白居易 --corpus data/poetry --base-steps 800 --steps 200
    python scripts/bench_finetune.py --poet 李白 --corpus data/poetry --base outputs/runs/default/export \\
        --exclude lingmao/corpus/poetry_sample/train.jsonl

1. The poet's records of `--corpus` are split (`scripts/prepare_corpus.py --poet`): about `--test-fraction` of
   them, by a hash of the text, are held out, never a text of the `--exclude` files (the base model's training
   data; default the bundled sample, the default run's data).
2. The base model is `--base` (an export), or the default run (`python -m lingmao.train` with the app's
   defaults) for `--base-steps` steps.
3. Fine-tuned: `init_from=<base>` on the poet's training records for `--steps` steps, the characters the base's
   vocabulary lacks added (`init_from_extend_vocab=true`). From scratch: a model of the base's shape with the
   fine-tuned model's vocabulary, on the same records for the same steps, the same recipe. Both use the base's
   `data.condition`, so a conditioned base writes its header for the poet as for any poem. Held-out characters
   a model's vocabulary lacks are read as <unk> (counted in the table: the base has the most).
4. Each model scores the held-out poems one at a time (`lingmao.scoring.text_bits`, with the full header when the
   model has one; the header is never counted), and the test file of the base's data, to show what fine-tuning
   costs on everything else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SAMPLE = REPO / "lingmao" / "corpus" / "poetry_sample"


def _prepare_corpus():
    spec = importlib.util.spec_from_file_location("prepare_corpus", REPO / "scripts" / "prepare_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_run(label: str, overrides: list[str], out: Path) -> tuple[Path, float]:
    from lingmao.config import compose_config
    from lingmao.train import train

    cfg = compose_config([*overrides, f"paths.output_dir={out}", f"run_name={label}", "auto_resume=false",
                          "night=off", "show_samples=false", "logger.plots=false"])
    started = time.perf_counter()
    result = train(cfg)
    if result.export_dir is None:
        raise SystemExit(f"{label}: the run wrote no export")
    return result.export_dir, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--poet", required=True, help="the author, as the corpus writes it (e.g. 白居易)")
    parser.add_argument("--corpus", type=Path, required=True, help="a folder of .jsonl files with author fields")
    parser.add_argument("--base", type=Path, help="the base model's export (default: train the default run)")
    parser.add_argument("--base-steps", type=int, default=800, help="steps of the default run when --base is not given")
    parser.add_argument("--exclude", type=Path, nargs="*", default=[SAMPLE / "train.jsonl"],
                        help="the base model's training files: never held out")
    parser.add_argument("--general-test", type=Path, default=SAMPLE / "test.jsonl",
                        help="held-out poems of the base's data (what fine-tuning costs elsewhere)")
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=200, help="steps of the fine-tuned and the from-scratch run")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for the fine-tuned and the from-scratch run")
    parser.add_argument("--finetune-set", nargs="*", default=[], help="overrides for the fine-tuned run only")
    parser.add_argument("--output-dir", type=Path, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args(argv)

    from lingmao.data.condition import BODY_MARK
    from lingmao.export import load_model
    from lingmao.scoring import documents_of, text_bits

    logging.getLogger("lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    prepare = _prepare_corpus()
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        root = args.output_dir or Path(tmp)
        poet_dir = root / "poet"
        exclude = {json.loads(line).get("text") for path in args.exclude for line in prepare.read_lines(path)}
        train, test = prepare.poet_split(prepare.corpus_lines(args.corpus), args.poet, args.test_fraction, exclude)
        if not train or not test:
            raise SystemExit(f"--poet {args.poet}: {len(train)} training and {len(test)} held-out records in "
                             f"{args.corpus}; need some of each")
        prepare.write_jsonl(poet_dir / "train.jsonl", train)
        prepare.write_jsonl(poet_dir / "test.jsonl", test)
        print(f"{args.poet}: {len(train)} training records, {len(test)} held out", flush=True)

        if args.base is None:
            base, seconds = train_run("base", [f"trainer.max_steps={args.base_steps}"], root)
            base_label = f"base: the default run, {args.base_steps} steps ({seconds:.0f} s)"
        else:
            base, base_label = args.base, f"base: {args.base}"
        base_config = json.loads((base / "config.json").read_text(encoding="utf-8"))
        fields = (base_config.get("condition") or {}).get("fields") or []
        data = [
            "data=jsonl", f"data.train_file={poet_dir / 'train.jsonl'}", f"data.test_file={poet_dir / 'test.jsonl'}",
            f"data.condition=[{','.join(fields)}]", f"data.convert={base_config['data'].get('convert') or 'none'}",
            f"data.context_length={base_config['data'].get('context_length') or 128}",
            f"trainer.max_steps={args.steps}", "trainer.max_epochs=-1",
        ]
        shape = [f"model.{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in base_config["model"].items()
                 if k in ("arch", "d_model", "nhead", "num_layers", "dim_feedforward", "max_len", "tie_weights")]
        tuned, tuned_s = train_run("finetuned", [*data, f"init_from={base}", "init_from_extend_vocab=true", *args.set,
                                                 *args.finetune_set], root)
        scratch, scratch_s = train_run("scratch", [*data, *shape, f"data.tokenizer_path={tuned / 'tokenizer.json'}",
                                                   *args.set], root)

        rows = []
        for label, export in ((base_label, base),
                              (f"fine-tuned from the base, {args.steps} steps ({tuned_s:.0f} s)", tuned),
                              (f"from scratch on {args.poet} alone, {args.steps} steps ({scratch_s:.0f} s)", scratch)):
            lm = load_model(export)
            documents = documents_of(lm, poet_dir / "test.jsonl")
            unknown = sum(lm.tokenizer.token_to_id(ch) is None for doc in documents
                          for ch in doc.partition(BODY_MARK)[2 if BODY_MARK in doc else 0])
            own = text_bits(lm, documents)
            general = text_bits(lm, documents_of(lm, args.general_test))
            rows.append((label, own, general, unknown))
    print(f"\nheld out: {rows[0][1].documents} poems of {args.poet} ({rows[0][1].characters} characters); "
          f"header: {', '.join(fields) or 'none'}; settings: {' '.join(args.set + args.finetune_set) or '(defaults)'}")
    print(f"| model | {args.poet} held-out bits/char | held-out characters read as <unk> | "
          f"{args.general_test.name} bits/char |")
    print("| --- | --- | --- | --- |")
    for label, own, general, unknown in rows:
        print(f"| {label} | {own.bits_per_char:.3f} | {unknown} | {general.bits_per_char:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
