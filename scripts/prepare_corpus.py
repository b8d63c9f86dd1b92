"""Build the JSONL corpus from the `chinese-poetry` package (MIT, (c) 2016 JackeyGao), and the bundled sample.

    npm pack chinese-poetry                         # gives chinese-poetry-2.0.1.tgz
    python scripts/prepare_corpus.py --source chinese-poetry-2.0.1.tgz --out data/poetry
    python scripts/prepare_corpus.py --source path/to/chinese-poetry/   # an unpacked package or git checkout
    python scripts/prepare_corpus.py --from-jsonl ../shared/corpus/poetry --out data/poetry   # a ready corpus

Writes OUT/train.jsonl and OUT/test.jsonl, one {"text", "title", "author", "source"} object a line: Tang shi,
Song ci, Shijing, Chuci and Lunyu. The split is fixed by a hash of each record (about 2% test), so every run
sees the same split. With --sample DIR it also writes the small corpus shipped in the package (every 10th
training record and every 3rd test record).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

LICENCE = (
    "Source: the chinese-poetry package (MIT licence, copyright 2016 JackeyGao). The texts are in the public domain."
)


def _numbered(folder: Path, pattern: str) -> list[Path]:
    """Files like poet.tang.12000.json in numeric order."""
    rx = re.compile(pattern)
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := rx.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def read_package(root: Path) -> Iterator[dict[str, str]]:
    """Records of the five collections, in a fixed order."""
    dist = root / "dist" if (root / "dist").is_dir() else root
    for path in _numbered(dist / "quantangshi", r"poet\.tang\.(\d+)\.json"):
        for r in json.loads(path.read_text(encoding="utf-8")):
            yield {"text": "\n".join(r["paragraphs"]), "title": r.get("title", ""), "author": r.get("author", ""),
                   "source": "quantangshi"}
    for path in _numbered(dist / "songci", r"ci\.song\.(\d+)\.json"):
        for r in json.loads(path.read_text(encoding="utf-8")):
            yield {"text": "\n".join(r["paragraphs"]), "title": r.get("rhythmic", ""), "author": r.get("author", ""),
                   "source": "songci"}
    for r in json.loads((dist / "shijing" / "shijing.json").read_text(encoding="utf-8")):
        yield {"text": "\n".join(r["content"]), "title": r.get("title", ""), "author": "", "source": "shijing"}
    for r in json.loads((dist / "chuci" / "chuci.json").read_text(encoding="utf-8")):
        yield {"text": "\n".join(r["content"]), "title": r.get("title", ""), "author": r.get("author", ""),
               "source": "chuci"}
    for r in json.loads((dist / "lunyu" / "lunyu.json").read_text(encoding="utf-8")):
        yield {"text": "\n".join(r["paragraphs"]), "title": r.get("chapter", ""), "author": "", "source": "lunyu"}


def is_test(record: dict[str, str], one_in: int = 50) -> bool:
    key = f"{record['source']}|{record['title']}|{record['author']}|{record['text']}".encode()
    return int(hashlib.sha256(key).hexdigest(), 16) % one_in == 0


def write_jsonl(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)


def build_from_package(source: Path) -> tuple[list[str], list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        if source.is_file():
            with tarfile.open(source) as tar:
                tar.extractall(tmp, filter="data")
            source = Path(tmp) / "package"
        train, test = [], []
        for r in read_package(source):
            if not r["text"].strip():
                continue
            (test if is_test(r) else train).append(json.dumps(r, ensure_ascii=False))
    return train, test


def read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--source", type=Path, help="chinese-poetry .tgz (npm pack) or unpacked folder")
    g.add_argument("--from-jsonl", type=Path, help="a folder with train.jsonl and test.jsonl already made")
    p.add_argument("--out", type=Path, help="where to write train.jsonl / test.jsonl (e.g. data/poetry)")
    p.add_argument("--sample", type=Path, help="also write the small sample corpus here")
    args = p.parse_args(argv)
    if args.source is not None:
        if not args.source.exists():
            print(f"error: {args.source}: not found (run `npm pack chinese-poetry` first)", file=sys.stderr)
            return 2
        train, test = build_from_package(args.source)
    else:
        train, test = read_lines(args.from_jsonl / "train.jsonl"), read_lines(args.from_jsonl / "test.jsonl")
    if args.out:
        write_jsonl(args.out / "train.jsonl", train)
        write_jsonl(args.out / "test.jsonl", test)
        (args.out / "README.md").write_text(LICENCE + "\n", encoding="utf-8")
        if args.from_jsonl and (args.from_jsonl / "README.md").is_file():
            shutil.copy(args.from_jsonl / "README.md", args.out / "README.md")
        print(f"{args.out}: {len(train)} training and {len(test)} test records")
    if args.sample:
        write_jsonl(args.sample / "train.jsonl", train[::10])
        write_jsonl(args.sample / "test.jsonl", test[::3])
        print(f"{args.sample}: {len(train[::10])} training and {len(test[::3])} test records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
