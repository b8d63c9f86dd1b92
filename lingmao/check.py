"""`python -m lingmao.check text=... | file=...`: the verdict on classical poems, and rates over a file.

For each poem: the form (given, or detected), its shape, the rhyme class of each rhyming position, the tones
against the best-fitting pattern and every fault by position; then a summary of rates (format, rhyme, 对粘,
tones lenient and strict). The rules are in `lingmao.verse.checker`; this module reads the input and prints.
"""

from __future__ import annotations

import gzip
import json
import logging
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lingmao.cli import run_app
from lingmao.errors import LingmaoError
from lingmao.io import decode_utf8, input_file_problem, read_text_file

log = logging.getLogger(__name__)
MARKS = "○●◐？"  # tone-mark lines of `python -m lingmao.generate show_tones=true` are skipped


@dataclass(frozen=True)
class Poem:
    where: str  # "file:line", or "text"
    text: str
    title: str | None = None


def read_jsonl(path: Path, text_key: str, title_key: str | None, source: str | None) -> Iterator[Poem]:
    """One poem a JSON record; a bad line is a one-line error naming the file and line."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                line = decode_utf8(raw, str(path), lineno)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise LingmaoError(f"{where}: invalid JSON ({str(exc).split(':')[0]})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise LingmaoError(f"{where}: no text field '{text_key}' (set text_key=...)")
                if source is not None and record.get("source") != source:
                    continue
                title = record.get(title_key) if title_key else None
                yield Poem(where, record[text_key], title if isinstance(title, str) else None)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise LingmaoError(f"{path}: damaged gzip file ({exc}); re-create or re-download it") from None
    except OSError as exc:
        raise LingmaoError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def read_text(path: Path, separator: str) -> Iterator[Poem]:
    """Poems separated by lines starting with `separator` ("" = by blank lines); tone-mark lines are skipped."""
    lines = read_text_file(path).splitlines()
    current: list[str] = []
    start = 1
    for lineno, line in enumerate([*lines, None], start=1):
        end = line is None or (line.strip().startswith(separator) if separator else not line.strip())
        if end:
            if any(s.strip() for s in current):
                yield Poem(f"{path}:{start}", "\n".join(current).strip("\n"))
            current, start = [], lineno + 1
        elif not line.lstrip().startswith(tuple(MARKS)):
            current.append(line)


def poems(cfg: DictConfig) -> Iterator[Poem]:
    if bool(cfg.get("text")) == bool(cfg.get("file")):
        raise LingmaoError("give exactly one of text=POEM or file=PATH (.jsonl, .jsonl.gz or plain text; a list "
                           "[A,B] for several)")
    if cfg.get("text"):
        yield Poem("text", str(cfg.text))
        return
    files = list(cfg.file) if not isinstance(cfg.file, str) else [cfg.file]
    if len(files) == 1 and str(files[0]).startswith("[") and str(files[0]).endswith("]"):
        files = [f.strip() for f in str(files[0])[1:-1].split(",") if f.strip()]  # a list quoted as one string
    for name in files:
        problem = input_file_problem(Path(str(name)))
        if problem:
            raise LingmaoError(f"file: {problem}")
    for name in files:
        path = Path(str(name))
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            yield from read_jsonl(path, str(cfg.text_key), cfg.get("title_key"), cfg.get("source"))
        else:
            if cfg.get("source"):
                raise LingmaoError("source: only for JSONL files")
            yield from read_text(path, str(cfg.separator or ""))


def run(cfg: DictConfig) -> dict[str, Any]:
    from lingmao.verse.checker import Summary, check
    from lingmao.verse.forms import RHYMES

    if cfg.rhyme not in RHYMES:
        raise LingmaoError(f"rhyme: '{cfg.rhyme}' is not one of {', '.join(RHYMES)}")
    limit = cfg.get("limit")
    if limit is not None and int(limit) < 1:
        raise LingmaoError(f"limit: {limit} must be >= 1")
    output = Path(str(cfg.output)) if cfg.get("output") else None
    if output is not None and output.exists():
        raise LingmaoError(f"output: {output} exists; give a new file name")
    summary, verdicts = Summary(), []
    for n, poem in enumerate(poems(cfg)):
        if limit is not None and n >= int(limit):
            break
        verdict = check(poem.text, cfg.get("form"), tune=cfg.get("tune"), title=poem.title,
                        rhyme_mode=str(cfg.rhyme), acrostic=str(cfg.get("acrostic") or ""))
        summary.add(verdict)
        if output is not None:
            verdicts.append({"where": poem.where, "title": poem.title, **verdict.to_dict()})
        if cfg.details:
            title = f" 《{poem.title}》" if poem.title else ""
            sys.stdout.write(f"--- {poem.where}{title}\n{verdict.report()}\n")
    if summary.poems == 0:
        raise LingmaoError("no poems to check" + (f" (none with source={cfg.source})" if cfg.get("source") else ""))
    if summary.poems > 1:
        sys.stdout.write(summary.report() + "\n")
    result = {"summary": summary.to_dict(), "poems": verdicts}
    if output is not None:
        from lingmao.io import atomic_write_bytes

        atomic_write_bytes(output, json.dumps(result, ensure_ascii=False, indent=1).encode("utf-8"))
        log.info("verdicts written to %s", output)
    return result


if __name__ == "__main__":
    run_app(run, "check")
