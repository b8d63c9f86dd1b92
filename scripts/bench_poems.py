"""What generated poems are worth: author control, judged by an attribution classifier, and copying, before and
after the line filter, side by side in one invocation.

    python scripts/bench_poems.py --corpus data/poetry                  # the classifier alone
    python scripts/bench_poems.py --model-dir outputs/runs/default/export --samples 100  # + copying and 重韵
    python scripts/bench_poems.py --corpus data/poetry --model-dir DIR --per-poet 20   # + author control

1. **The classifier** (`lingmao.attribution`): fitted on the poems of the `--poets` most prolific poets of
   CORPUS/train.jsonl (the training split), scored on their poems in CORPUS/test.jsonl (held out): accuracy, and
   balanced accuracy (the mean over the poets of the share of theirs named right; chance 1 / poets). Texts are
   converted as the model's data.convert (t2s without --model-dir) so that the classifier reads generated verse
   in its script.
2. **Author control** (`--per-poet N` and a model that takes `author=`): for each poet, N 七绝 generated with
   `author=` that poet, and the share the classifier attributes to them; beside it the share of N x poets
   unconditioned 七绝 it attributes to that poet (what the model writes anyway) and its recall on the poet's
   held-out real poems. A model that does not take `author=` is reported and skipped.
3. **Copying** (`--samples N`): N poems per form with the generation defaults (Pingshui rhyme, lenient tones),
   once as before the line filter and the no-重韵 rule existed (refuse_copies=false distinct_rhymes=false) and
   once with the defaults: copied lines, the longest copied run, no 重韵, 重字 per poem, distinct-2
   (`lingmao.evaluate.evaluate_verse`, against the training files the export names, or --train-file).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lingmao.attribution import AuthorClassifier, accuracy, top_authors  # noqa: E402
from lingmao.data import make_converter  # noqa: E402
from lingmao.errors import LingmaoError  # noqa: E402

SAMPLE = REPO / "lingmao" / "corpus" / "poetry_sample"


def read_split(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def converted(texts: list[str], convert: str) -> list[str]:
    converter = make_converter(convert)
    if converter is None:
        return texts
    from lingmao.data.reading import convert_all

    return convert_all(converter, texts)


def classifier_section(corpus: Path, poets: int, convert: str) -> tuple[AuthorClassifier, dict, list[str]]:
    """Fit and score the classifier; print its table. Returns it, per-poet held-out recall, and the poets."""
    train, test = read_split(corpus / "train.jsonl"), read_split(corpus / "test.jsonl")
    names = top_authors((r.get("author") for r in train), poets)
    chosen = set(names)
    fit = [r for r in train if r.get("author") in chosen]
    held = [r for r in test if r.get("author") in chosen]
    start = time.perf_counter()
    clf = AuthorClassifier.fit(converted([r["text"] for r in fit], convert), [r["author"] for r in fit])
    seconds = time.perf_counter() - start
    predicted = clf.predict(converted([r["text"] for r in held], convert))
    actual = [r["author"] for r in held]
    acc, balanced = accuracy(predicted, actual)
    recall = {}
    for name in names:
        mine = [p == a for p, a in zip(predicted, actual, strict=True) if a == name]
        recall[name] = (sum(mine), len(mine))
    print(f"\n## Attribution classifier: {len(names)} poets, character 1-2-grams, data.convert={convert}\n")
    print("| figure | value |")
    print("| --- | --- |")
    print(f"| training poems (CORPUS/train.jsonl) | {len(fit):,} |")
    print(f"| held-out poems (CORPUS/test.jsonl) | {len(held):,} |")
    print(f"| features | {len(clf.columns):,} |")
    print(f"| held-out accuracy | {100 * acc:.1f}% |")
    print(f"| held-out balanced accuracy (chance {100 / len(names):.1f}%) | {100 * balanced:.1f}% |")
    print(f"| fitting time | {seconds:.0f} s |")
    return clf, recall, names


def author_section(lm, clf: AuthorClassifier, names: list[str], recall: dict, per_poet: int, seed: int) -> None:
    """Generated 七绝 conditioned on each poet, attributed by the classifier; printed as a table."""
    print(f"\n## Author control: {per_poet} 七绝 per poet, attributed by the classifier\n")
    shares = {}
    for i, name in enumerate(names):
        try:
            poems = lm.generate(form="qijue", author=name, num_samples=per_poet, seed=seed + i)
        except (TypeError, LingmaoError) as exc:  # TypeError: a lingmao without author=
            print(f"skipped: the model does not take author= ({str(exc).splitlines()[0]})")
            return
        shares[name] = Counter(clf.predict(poems))[name] / len(poems)
    plain = clf.predict(lm.generate(form="qijue", num_samples=per_poet * len(names), seed=seed + len(names)))
    anyway = Counter(plain)
    print("| poet | held-out real poems named right | generated with author=poet: attributed to poet | "
          "unconditioned: attributed to poet |")
    print("| --- | --- | --- | --- |")
    for name in names:
        right, of = recall[name]
        print(f"| {name} | {right}/{of} | {100 * shares[name]:.0f}% | {100 * anyway[name] / len(plain):.0f}% |")
    mean = sum(shares.values()) / len(shares)
    print(f"| **mean** | | **{100 * mean:.1f}%** (chance {100 / len(names):.1f}%) | "
          f"{100 / len(names):.1f}% on average |")


def copying_section(lm, samples: int, forms: list[str], train_file: str | None, seed: int, temperature: float) -> None:
    from lingmao.evaluate import evaluate_verse, training_reference

    lines, text = training_reference(lm, train_file)
    if lines is None:
        print("\ncopying: no training data to compare with (--train-file)")
        return
    settings = {"before (refuse_copies=false distinct_rhymes=false)": dict(refuse_copies=False,
                                                                            distinct_rhymes=False),
                "after (the defaults)": dict()}
    results = {}
    for label, options in settings.items():
        start = time.perf_counter()
        results[label] = evaluate_verse(lm, forms, samples, rhyme="pingshui", tones="lenient", seed=seed,
                                        train_lines=lines, train_text=text, temperature=temperature, **options)
        print(f"{label}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"\n## Copying: {samples} poems per form, rhyme=pingshui tones=lenient temperature={temperature}, "
          f"against {len(lines):,} training lines\n")
    print("| form | setting | copied lines | longest copied run: max (mean) | no 重韵 | 重字 per poem | distinct-2 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for form in forms:
        for label in settings:
            r = results[label][form]
            run = "-"
            if "longest copied run" in r:
                run = f"{r['longest copied run']} ({r['mean longest copied run']:.1f})"
            print(f"| {form} | {label} | {100 * r['copied lines']:.1f}% | {run} | {100 * r['no 重韵']:.0f}% | "
                  f"{r['repeated chars per poem']:.2f} | {r['distinct-2']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=SAMPLE, help="a folder with train.jsonl and test.jsonl "
                        "(title, author fields); default: the bundled sample")
    parser.add_argument("--poets", type=int, default=20, help="the most prolific poets the classifier knows")
    parser.add_argument("--model-dir", type=Path, help="an export: generates for sections 2 and 3")
    parser.add_argument("--per-poet", type=int, default=0, help="七绝 generated per poet (0: no author control)")
    parser.add_argument("--samples", type=int, default=0, help="poems per form for copying (0: no copying)")
    parser.add_argument("--forms", default="wujue,qijue,wulv,qilv")
    parser.add_argument("--temperature", type=float, default=0.8, help="copying: sampling temperature (top_p 0.9)")
    parser.add_argument("--train-file", help="the training text for copying (default: the files the export names)")
    parser.add_argument("--convert", help="none | t2s | s2t (default: the model's data.convert, else t2s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*Sparse invariant checks.*")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    lm = None
    if args.model_dir:
        from lingmao import load_model

        lm = load_model(args.model_dir, device=args.device)
    convert = args.convert or ((lm.config.get("data") or {}).get("convert") if lm else None) or "t2s"
    if args.per_poet or lm is None:
        clf, recall, names = classifier_section(args.corpus, args.poets, convert)
        if lm is not None and args.per_poet:
            author_section(lm, clf, names, recall, args.per_poet, args.seed)
    if lm is not None and args.samples:
        copying_section(lm, args.samples, [f for f in args.forms.split(",") if f], args.train_file, args.seed,
                        args.temperature)
    return 0


if __name__ == "__main__":
    sys.exit(main())
