"""Build the JSONL corpus from the `chinese-poetry` package (MIT, (c) 2016 JackeyGao), and the bundled sample.

    npm pack chinese-poetry                         # gives chinese-poetry-2.0.1.tgz
    python scripts/prepare_corpus.py --source chinese-poetry-2.0.1.tgz --out data/poetry
    python scripts/prepare_corpus.py --source path/to/chinese-poetry/   # an unpacked package or git checkout
    python scripts/prepare_corpus.py --from-jsonl ../shared/corpus/poetry --out data/poetry   # a ready corpus
    python scripts/prepare_corpus.py --source chinese-poetry-2.0.1.tgz --full --out data/poetry_full
    python scripts/prepare_corpus.py --from-jsonl data/poetry --poet 白居易 --out data/poet-baijuyi \
        --exclude lingmao/corpus/poetry_sample/train.jsonl     # one poet's works, split for fine-tuning

Without --full: OUT/train.jsonl and OUT/test.jsonl, one {"text", "title", "author", "source"} object a line:
Tang shi, Song ci, Shijing, Chuci and Lunyu (`data=poetry`). The split is fixed by a hash of each record (about
2% test), so every run sees the same split. With --sample DIR it also writes the small corpus shipped in the
package (every 10th training record and every 3rd test record).

With --full: every text collection of the package (`FULL_COLLECTIONS`: Tang and Song shi, Song ci, Five
Dynasties ci, Yuan qu, Shijing, Chuci, the Four Books, Lunyu, Cao Cao, Nalan Xingde, Youmengying and the
primers), each text once (exact duplicates dropped, first one kept), split by a hash of the text into
OUT/train/, OUT/val/ and OUT/test/ (about 2% each for val and test), one file per collection (`data=poetry_full`).
Left out: anthologies of poems the collections already hold (Tang 300, Song ci 300, Shuimo Tang shi,
Qianjiashi), the second edition of the Tang corpus (yudingquantangshi: the same poems with variant characters,
which would put near-copies of training poems into validation and test), records the package marks as errors,
and tables without text (ranks, tone patterns, authors).

With --poet NAME (and --from-jsonl, any folder of .jsonl files): the records of one poet (the `author` field,
compared after converting both to simplified characters), each text once, into OUT/train.jsonl and
OUT/test.jsonl: a text goes to the test when a hash of it falls in the first --test-fraction (default 0.1) of
the range and it is in none of the --exclude files (the training data of the model to be fine-tuned, which must
not have seen a test poem). For fine-tuning on one poet's works (docs/training.md, scripts/bench_finetune.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# ----------------------------------------------------------------------------------------------
# --full: every text collection, deduplicated, split train / val / test by a hash of the text
# ----------------------------------------------------------------------------------------------
def _lines(r: dict) -> list[str]:
    for key in ("paragraphs", "para", "content"):
        value = r.get(key)
        if isinstance(value, list) and all(isinstance(x, str) for x in value):
            return value
        if isinstance(value, str):
            return [value]
    return []


def _records(path: Path, title_keys: tuple[str, ...] = ("title", "rhythmic", "chapter")) -> Iterator[dict]:
    """Every object of a package file that holds lines of text (found at any depth: the primers nest them)."""
    data = json.loads(path.read_text(encoding="utf-8"))

    def walk(node: object, title: str) -> Iterator[dict]:
        if isinstance(node, dict):
            own = next((str(node[k]) for k in title_keys if node.get(k)), title)
            lines = _lines(node)
            if lines:
                yield {"text": "\n".join(line.strip() for line in lines if line.strip()), "title": own,
                       "author": str(node.get("author") or "").strip()}
            else:
                for value in node.values():
                    if isinstance(value, list | dict):
                        yield from walk(value, own)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item, title)

    yield from walk(data, "")


# (collection, files under dist/ as globs, in order). Numbered files are read in numeric order.
FULL_COLLECTIONS: list[tuple[str, list[str]]] = [
    ("tang_shi", [r"quantangshi/poet\.tang\.(\d+)\.json"]),
    ("song_shi", [r"quantangshi/poet\.song\.(\d+)\.json"]),
    ("song_ci", [r"songci/ci\.song\.(\d+)\.json", "songci/ci.song.2019y.json"]),
    ("wudai_ci", [r"wudaishici/huajianji/huajianji-(\d+)-juan\.json", "wudaishici/huajianji/huajianji-x-juan.json",
                  "wudaishici/nantang/poetrys.json"]),
    ("yuan_qu", ["yuanqu/yuanqu.json"]),
    ("shijing", ["shijing/shijing.json"]),
    ("chuci", ["chuci/chuci.json"]),
    ("lunyu", ["lunyu/lunyu.json"]),
    ("sishu", ["sishuwujing/daxue.json", "sishuwujing/zhongyong.json", "sishuwujing/mengzi.json"]),
    ("caocao", ["caocaoshiji/caocao.json"]),
    ("nalan_xingde", ["nalanxingde/纳兰性德诗集.json"]),
    ("youmengying", ["youmengying/youmengying.json"]),
    ("mengxue", [f"mengxue/{name}.json" for name in (
        "sanzijing-traditional", "qianziwen", "baijiaxing", "dizigui", "zhuzijiaxun", "zengguangxianwen",
        "youxueqionglin", "shenglvqimeng", "wenzimengqiu", "guwenguanzhi")]),
]


def _collection_files(dist: Path, patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        folder, _, name = pattern.rpartition("/")
        if "(" in name:
            files += _numbered(dist / folder, name)
        elif (dist / pattern).is_file():
            files.append(dist / pattern)
        else:
            raise FileNotFoundError(f"{dist / pattern}: not in the package (another version of chinese-poetry?)")
    return files


def split_of(text: str, val: float, test: float) -> str:
    """'test', 'val' or 'train' by a hash of the text: the same text always lands in the same split."""
    u = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    return "test" if u < test else "val" if u < test + val else "train"


def build_full(dist: Path, out: Path, val: float, test: float) -> dict[str, dict[str, list[int]]]:
    """Write OUT/{train,val,test}/<collection>.jsonl; {collection: {split: [texts, characters]}}."""
    seen: set[bytes] = set()
    stats: dict[str, dict[str, list[int]]] = {}
    duplicates = 0
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for collection, patterns in FULL_COLLECTIONS:
            counts = stats.setdefault(collection, {split: [0, 0] for split in ("train", "val", "test")})
            with contextlib.ExitStack() as stack:
                files = {}
                for split in counts:
                    (staging / split).mkdir(exist_ok=True)
                    files[split] = stack.enter_context(open(staging / split / f"{collection}.jsonl", "w",
                                                            encoding="utf-8"))
                for path in _collection_files(dist, patterns):
                    for r in _records(path):
                        digest = hashlib.sha256(r["text"].encode("utf-8")).digest()
                        if not r["text"].strip() or digest in seen:
                            duplicates += digest in seen
                            continue
                        seen.add(digest)
                        split = split_of(r["text"], val, test)
                        files[split].write(json.dumps({**r, "source": collection}, ensure_ascii=False) + "\n")
                        counts[split][0] += 1
                        counts[split][1] += len(r["text"])
        for empty in [f for f in staging.glob("*/*.jsonl") if f.stat().st_size == 0]:
            empty.unlink()  # a small collection with no text in a split: no file rather than an empty one
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (out / "README.md").write_text(LICENCE + "\n", encoding="utf-8")
    print(f"{len(seen):,} distinct texts ({duplicates:,} repeated texts left out)")
    return stats


def _print_full(out: Path, stats: dict[str, dict[str, list[int]]]) -> None:
    print(f"{'collection':14s} {'train':>16s} {'val':>14s} {'test':>14s}   (texts / characters)")
    for collection, counts in stats.items():
        cells = [f"{n:,} / {c / 1e6:.2f} M" for n, c in (counts[s] for s in ("train", "val", "test"))]
        print(f"{collection:14s} {cells[0]:>16s} {cells[1]:>14s} {cells[2]:>14s}")
    total = {s: [sum(c[s][i] for c in stats.values()) for i in (0, 1)] for s in ("train", "val", "test")}
    print(f"{'all':14s} " + " ".join(f"{n:,} / {c / 1e6:.2f} M".rjust(w) for (n, c), w in
                                       zip(total.values(), (16, 14, 14), strict=True)))
    print(f"written to {out}/train, {out}/val, {out}/test")


def _unpacked(source: Path, stack: contextlib.ExitStack) -> Path:
    """The package folder of a .tgz (unpacked into a temporary folder) or of a checkout."""
    if source.is_file():
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        with tarfile.open(source) as tar:
            tar.extractall(tmp, filter="data")
        source = Path(tmp) / "package"
    return source / "dist" if (source / "dist").is_dir() else source


def is_test(record: dict[str, str], one_in: int = 50) -> bool:
    key = f"{record['source']}|{record['title']}|{record['author']}|{record['text']}".encode()
    return int(hashlib.sha256(key).hexdigest(), 16) % one_in == 0


def write_jsonl(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)


def build_from_package(source: Path) -> tuple[list[str], list[str]]:
    with contextlib.ExitStack() as stack:
        train, test = [], []
        for r in read_package(_unpacked(source, stack)):
            if not r["text"].strip():
                continue
            (test if is_test(r) else train).append(json.dumps(r, ensure_ascii=False))
    return train, test


@functools.cache
def _simplified(text: str) -> str:
    import opencc

    return _t2s(opencc).convert(text)


@functools.cache
def _t2s(opencc: Any) -> Any:
    return opencc.OpenCC("t2s")


def poet_split(lines: list[str], poet: str, test_fraction: float,
               exclude: set[str] | None = None) -> tuple[list[str], list[str]]:
    """(train, test) JSONL lines of `poet`'s records among `lines` (see the module docstring)."""
    name = _simplified(poet)
    train: list[str] = []
    test: list[str] = []
    seen: set[str] = set()
    for line in lines:
        record = json.loads(line)
        text = record.get("text")
        if not isinstance(text, str) or text in seen or _simplified(str(record.get("author") or "")) != name:
            continue
        seen.add(text)
        held_out = split_of(text, 0.0, test_fraction) == "test" and text not in (exclude or set())
        (test if held_out else train).append(line)
    return train, test


def corpus_lines(folder: Path) -> list[str]:
    """The lines of every .jsonl file under `folder`, in name order."""
    return [line for path in sorted(folder.rglob("*.jsonl")) for line in read_lines(path)]


def _poet_main(args: argparse.Namespace) -> int:
    if args.from_jsonl is None or args.out is None:
        print("error: --poet needs --from-jsonl (a corpus folder) and --out", file=sys.stderr)
        return 2
    fraction = 0.1 if args.test_fraction is None else args.test_fraction
    exclude = {json.loads(line).get("text") for path in args.exclude for line in read_lines(path)}
    lines = corpus_lines(args.from_jsonl)
    train, test = poet_split(lines, args.poet, fraction, exclude)
    if not train:
        import difflib

        authors = sorted({str(json.loads(line).get("author") or "") for line in lines})
        close = difflib.get_close_matches(args.poet, authors, n=5, cutoff=0.4)
        hint = f"; close: {', '.join(close)}" if close else ""
        print(f"error: --poet {args.poet}: no training record of this author in {args.from_jsonl}{hint}",
              file=sys.stderr)
        return 2
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    chars = [sum(len(json.loads(line)["text"]) for line in part) for part in (train, test)]
    print(f"{args.out}: {args.poet}: {len(train)} training records ({chars[0]:,} characters), {len(test)} test "
          f"records ({chars[1]:,} characters; none in {len(args.exclude)} excluded file(s))")
    return 0


def read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--source", type=Path, help="chinese-poetry .tgz (npm pack) or unpacked folder")
    g.add_argument("--from-jsonl", type=Path, help="a folder with train.jsonl and test.jsonl already made")
    p.add_argument("--out", type=Path, help="where to write train.jsonl / test.jsonl (e.g. data/poetry)")
    p.add_argument("--sample", type=Path, help="also write the small sample corpus here")
    p.add_argument("--full", action="store_true", help="every text collection, into OUT/train, OUT/val, OUT/test")
    p.add_argument("--val-fraction", type=float, default=0.02, help="--full: share of texts for validation")
    p.add_argument("--test-fraction", type=float, help="share of texts for the test: --full 0.02, --poet 0.1")
    p.add_argument("--poet", help="one author's records, split train / test (with --from-jsonl and --out)")
    p.add_argument("--exclude", type=Path, nargs="*", default=[], help="--poet: texts of these files are never test")
    args = p.parse_args(argv)
    if args.poet:
        return _poet_main(args)
    if args.source is not None and not args.source.exists():
        print(f"error: {args.source}: not found (run `npm pack chinese-poetry` first)", file=sys.stderr)
        return 2
    if args.full:
        args.test_fraction = 0.02 if args.test_fraction is None else args.test_fraction
        if args.source is None or args.out is None or args.sample is not None:
            print("error: --full needs --source and --out (and no --sample)", file=sys.stderr)
            return 2
        if not (0 <= args.val_fraction and 0 <= args.test_fraction and args.val_fraction + args.test_fraction < 1):
            print("error: --val-fraction and --test-fraction: each >= 0, together < 1", file=sys.stderr)
            return 2
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            stats = build_full(_unpacked(args.source, stack), args.out, args.val_fraction, args.test_fraction)
        _print_full(args.out, stats)
        return 0
    if args.source is not None:
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
