"""Input files -> documents: which files an input names, and the text of every document in them.

An input (`data.train_file`, `val_file`, `test_file`) is one path, a list of them, a directory (its
`.jsonl`, `.jsonl.gz`, `.txt` and `.txt.gz` files, recursively, in name order) or a glob (the files it
matches, in name order). Formats, by file name:

- `.jsonl` / `.jsonl.gz` (and any other named file): one JSON object a line; the document is the value of
  `data.text_key`, or `data.template` filled with the line's fields.
- `.txt` / `.txt.gz`: `data.txt_mode=block` makes one document of every run of non-blank lines,
  `data.txt_mode=file` one document of the whole file.

Files are read a few MB of whole lines at a time. A JSONL chunk is parsed line by line with orjson and
checked as a whole; anything out of the ordinary in it (invalid JSON, not UTF-8, a missing key, a byte-order
mark inside the file, whitespace-only lines, a template) sends that chunk through the
line-by-line reader built on the standard `json` module, which decides what is a document and names the
file and line of every problem. Both give the same documents; the fast one is several times quicker.
"""

from __future__ import annotations

import glob
import gzip
import json
import operator
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from lingmao.errors import LingmaoError

if TYPE_CHECKING:
    from lingmao.data.condition import Conditioning

CONVERSIONS = ("none", "t2s", "s2t")
TXT_MODES = ("block", "file")
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")
MAX_SHOWN_BAD_LINES = 5
CHUNK_BYTES = 4 << 20  # whole lines read and parsed at a time
BOM = b"\xef\xbb\xbf"
_GLOB_CHARS = frozenset("*?[")
Header = Callable[[dict], str]  # a JSONL line's fields -> what goes before its text


# ----------------------------------------------------------------------------------------------
# Which files an input names
# ----------------------------------------------------------------------------------------------
def is_txt(path: Path) -> bool:
    """Plain text (read by `data.txt_mode`) rather than JSONL."""
    return path.name.endswith((".txt", ".txt.gz"))


def _where(path: str | Path) -> str:
    return "" if Path(path).is_absolute() else f" (relative to {Path.cwd()})"


def _entries(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | os.PathLike):
        return [str(value)]
    if isinstance(value, Iterable):
        return [str(v) for v in value]
    return [str(value)]


def _data_files(directory: Path) -> list[Path]:
    found = [
        p for p in directory.rglob("*")
        if p.name.endswith(DATA_SUFFIXES) and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]
    return sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(directory).as_posix())


def _expand(value: Any, key: str) -> tuple[list[Path], list[str]]:
    """(files, problems): the files `value` names, in order and each once, and what is wrong with it."""
    files: list[Path] = []
    problems: list[str] = []
    entries = _entries(value)
    if not entries and value is not None:
        problems.append(f"{key}: an empty list; give at least one file")
    for entry in entries:
        path = Path(entry).expanduser()
        if _GLOB_CHARS & set(entry) and not path.exists():
            matched = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            matched = [p for p in matched if p.is_file()]
            if not matched:
                problems.append(f"{key}: {entry}: matches no file{_where(entry)}")
            files += matched
        elif not path.exists():
            problems.append(f"{key}: {path}: file not found{_where(path)}")
        elif path.is_dir():
            inside = _data_files(path)
            if not inside:
                problems.append(f"{key}: {path}: is a directory with no {', '.join(DATA_SUFFIXES)} file in it")
            files += inside
        else:
            files.append(path)
    unique = list(dict.fromkeys(files))
    for path in unique:
        if not os.access(path, os.R_OK):
            problems.append(f"{key}: {path}: permission denied")
        elif path.stat().st_size == 0:
            problems.append(f"{key}: {path}: the file is empty")
    return unique, problems


def input_problems(value: Any, key: str) -> list[str]:
    """What is wrong with the files an input names (found, readable, not empty), without reading them."""
    return _expand(value, key)[1]


def input_files(value: Any, key: str) -> list[Path]:
    """The files an input names (a path, a list, a directory or a glob); a problem is a one-line error."""
    files, problems = _expand(value, key)
    if problems:
        raise LingmaoError(problems[0])
    return files


# ----------------------------------------------------------------------------------------------
# Reading a file in chunks of whole lines
# ----------------------------------------------------------------------------------------------
@dataclass
class ReadReport:
    """What reading a file found: documents read and lines skipped (with `on_bad_line: skip`)."""

    documents: int = 0
    skipped: int = 0
    bytes_read: int = 0
    first_skipped: list[str] | None = field(default=None)


def _line_chunks(path: Path, size: int, on_disk: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """Whole lines of `path` (decompressed), about `size` bytes at a time; the last may lack its newline.

    `on_disk(n)` is told the bytes of the file itself consumed so far (compressed bytes for .gz), for progress.
    """
    if not path.exists():
        raise LingmaoError(f"{path}: file not found")
    if path.is_dir():
        raise LingmaoError(f"{path}: is a directory, expected a .jsonl or .jsonl.gz file")
    try:
        with open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw
            pending: list[bytes] = []
            while block := stream.read(size):
                end = block.rfind(b"\n") + 1
                if end == 0:  # no line ends in this block: a long line goes on
                    pending.append(block)
                    continue
                yield b"".join([*pending, block[:end]]) if pending else block[:end]
                pending = [block[end:]] if end < len(block) else []
                if on_disk is not None:
                    on_disk(raw.tell())
            if pending:
                yield b"".join(pending)
            if on_disk is not None:
                on_disk(raw.tell())
    except PermissionError:
        raise LingmaoError(f"{path}: permission denied") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise LingmaoError(f"{path}: damaged gzip file ({exc}); re-create or re-download it") from None
    except OSError as exc:
        raise LingmaoError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


class _BadLines:
    """The `data.on_bad_line` policy: raise `file:line: what`, or count the line in the report and go on."""

    def __init__(self, path: Path, on_bad_line: str, report: ReadReport) -> None:
        if on_bad_line not in ("error", "skip"):
            raise LingmaoError(f"data.on_bad_line: '{on_bad_line}' is not one of error, skip")
        self.path, self.on_bad_line, self.report = path, on_bad_line, report
        if report.first_skipped is None:
            report.first_skipped = []

    def __call__(self, lineno: int, what: str) -> None:
        where = f"{self.path}:{lineno}: " + what.replace("\r", "\\r").replace("\n", "\\n")  # one line, always
        if self.on_bad_line == "error":
            raise LingmaoError(f"{where} (set data.on_bad_line=skip to skip such lines)")
        self.report.skipped += 1
        if len(self.report.first_skipped) < MAX_SHOWN_BAD_LINES:
            self.report.first_skipped.append(where)


# ----------------------------------------------------------------------------------------------
# JSONL
# ----------------------------------------------------------------------------------------------
def _split_lines(chunk: bytes) -> list[bytes]:
    lines = chunk.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the chunk ends with a newline
    return lines


def _jsonl_line(raw: bytes, lineno: int, text_key: str, template: str | None, bad: _BadLines,
                header: Header | None = None) -> str | None:
    """The document of one line (None: blank or skipped). The reference for what a line means."""
    if raw.startswith(BOM):  # a BOM: at the start of the file, or of files joined with cat
        raw = raw[3:]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad(lineno, f"not UTF-8 (byte {exc.start}); convert the file, e.g. iconv -f GB18030 -t UTF-8")
        return None
    if not line.strip():
        return None
    try:
        record = _loads(line, raw)
    except json.JSONDecodeError as exc:
        bad(lineno, f"invalid JSON ({exc.msg}, column {exc.colno})")
        return None
    except (ValueError, RecursionError) as exc:  # a number too long, nesting too deep
        bad(lineno, f"invalid JSON ({str(exc).split(';')[0]})")
        return None
    if not isinstance(record, dict):
        bad(lineno, f"expected a JSON object with a '{text_key}' field, got {type(record).__name__}")
        return None
    if template:
        try:
            text = template.format(**record)
        except KeyError as exc:
            bad(lineno, f"key {exc} of data.template '{template}' is missing")
            return None
        except (IndexError, ValueError, AttributeError, TypeError) as exc:
            bad(lineno, f"data.template '{template}' does not apply to this line ({exc})")
            return None
    else:
        if text_key not in record:
            bad(lineno, f"key '{text_key}' is missing (data.text_key; keys here: {', '.join(list(record)[:8])})")
            return None
        text = record[text_key]
        if not isinstance(text, str):
            bad(lineno, f"key '{text_key}' is a {type(text).__name__}, not a string")
            return None
    if header is not None:
        text = header(record) + text
    if "\\u" in line and not _encodable(text):
        bad(lineno, "the text holds an unpaired surrogate escape (\\ud800-\\udfff), which is not a character")
        return None
    return text.replace("\r\n", "\n")


def _loads(line: str, raw: bytes) -> Any:
    """json.loads; JSON nested deeper than it can recurse (about 1,000 levels) is parsed by orjson, which
    the fast path uses, so both read the same lines."""
    try:
        return json.loads(line)
    except RecursionError:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise RecursionError("maximum nesting depth exceeded") from None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fast_jsonl(chunk: bytes, lines: list[bytes], text_key: str, header: Header | None = None) -> list[str] | None:
    """The documents of a chunk of ordinary lines, or None when anything in it needs `_jsonl_line`."""
    try:  # map(): C loops; a blank line is invalid JSON to orjson, so the chunk goes the careful way
        if header is None:
            texts = list(map(operator.itemgetter(text_key), map(orjson.loads, lines)))
        else:
            records = list(map(orjson.loads, lines))
            texts = list(map(operator.itemgetter(text_key), records))
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        return None
    if set(map(type, texts)) - {str}:
        return None  # a text that is not a string
    if header is not None:
        texts = [header(r) + t for r, t in zip(records, texts, strict=True)]
    if b"\\r" in chunk or b"\\u000" in chunk:  # only escapes put a carriage return into a JSON string
        return [t.replace("\r\n", "\n") for t in texts]
    return texts


def _jsonl_chunks(path: Path, text_key: str, template: str | None, bad: _BadLines, report: ReadReport,
                  on_disk: Callable[[int], None] | None, header: Header | None = None) -> Iterator[list[str]]:
    first = 1  # the number of the chunk's first line
    for chunk in _line_chunks(path, CHUNK_BYTES, on_disk):
        report.bytes_read += len(chunk)
        lines = _split_lines(chunk)
        if first == 1 and lines and lines[0].startswith(BOM):
            lines[0] = lines[0][3:]
        texts = _fast_jsonl(chunk, lines, text_key, header) if template is None else None
        if texts is None:
            texts = [
                text for i, raw in enumerate(lines)
                if (text := _jsonl_line(raw, first + i, text_key, template, bad, header)) is not None
            ]
        report.documents += len(texts)
        first += len(lines)
        yield texts


# ----------------------------------------------------------------------------------------------
# Plain text
# ----------------------------------------------------------------------------------------------
def _decoded(chunk: bytes, first: int, bad: _BadLines) -> str:
    """A chunk as text ("\\r\\n" -> "\\n", byte-order marks at line starts dropped); bad lines reported."""
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError:
        good = []
        for i, raw in enumerate(chunk.split(b"\n")):
            try:
                good.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                bad(first + i, f"not UTF-8 (byte {exc.start}); convert the file, e.g. iconv -f GB18030 -t UTF-8")
        text = "\n".join(good)
    text = text.replace("\r\n", "\n")
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\n\ufeff", "\n")


def _txt_chunks(path: Path, txt_mode: str, bad: _BadLines, report: ReadReport,
                on_disk: Callable[[int], None] | None) -> Iterator[list[str]]:
    """`block`: a document per run of non-blank lines (blank: only whitespace); `file`: the whole file, blank
    lines at its start and end left out."""
    if txt_mode not in TXT_MODES:
        raise LingmaoError(f"data.txt_mode: '{txt_mode}' is not one of {', '.join(TXT_MODES)}")
    lines: list[str] = []  # the lines of the document still open
    first = 1  # the number of the chunk's first line
    for chunk in _line_chunks(path, CHUNK_BYTES, on_disk):
        report.bytes_read += len(chunk)
        start, first = first, first + chunk.count(b"\n")
        pieces = _decoded(chunk, start, bad).split("\n")
        if chunk.endswith(b"\n"):
            pieces.pop()
        texts: list[str] = []
        for line in pieces:
            if line and not line.isspace():
                lines.append(line)
            elif lines and txt_mode == "block":
                texts.append("\n".join(lines))
                lines = []
            elif lines:
                lines.append(line)
        report.documents += len(texts)
        yield texts
    while lines and (not lines[-1] or lines[-1].isspace()):
        lines.pop()
    if lines:
        report.documents += 1
        yield ["\n".join(lines)]


# ----------------------------------------------------------------------------------------------
# Documents of a file, and the text settings that make them
# ----------------------------------------------------------------------------------------------
def document_chunks(
    path: str | Path,
    text_key: str = "text",
    template: str | None = None,
    on_bad_line: str = "error",
    report: ReadReport | None = None,
    txt_mode: str = "block",
    on_disk: Callable[[int], None] | None = None,
    header: Header | None = None,
) -> Iterator[list[str]]:
    """The documents of `path` in lists (one a chunk of the file), as `iter_documents` yields them one by one.

    `header(record)` (JSONL only) is put before the text of each line (`lingmao.data.condition`)."""
    path = Path(path)
    report = report if report is not None else ReadReport()
    bad = _BadLines(path, on_bad_line, report)
    if is_txt(path):
        return _txt_chunks(path, txt_mode, bad, report, on_disk)
    return _jsonl_chunks(path, text_key, template or None, bad, report, on_disk, header)


def iter_documents(
    path: str | Path,
    text_key: str = "text",
    template: str | None = None,
    on_bad_line: str = "error",
    report: ReadReport | None = None,
    txt_mode: str = "block",
) -> Iterator[str]:
    """Yield the text of each document of `path` (see the module doc for formats).

    JSONL: `template` (e.g. "{title}\\n{text}") builds the text from several fields; by default it is the
    value of `text_key`. A bad line raises `LingmaoError("file:line: what")`, or with `on_bad_line="skip"`
    is counted in `report` and skipped. Blank lines are ignored; a BOM and Windows line endings are accepted.
    """
    for texts in document_chunks(path, text_key, template, on_bad_line, report, txt_mode):
        yield from texts


def make_converter(convert: str) -> Callable[[str], str] | None:
    """Return a str->str function for `data.convert` (none, t2s, s2t) using OpenCC."""
    if convert in (None, "none"):
        return None
    if convert not in CONVERSIONS:
        raise LingmaoError(f"data.convert: '{convert}' is not one of {', '.join(CONVERSIONS)}")
    try:
        import opencc
    except ImportError:  # pragma: no cover - opencc is a dependency
        raise LingmaoError("data.convert needs the 'opencc' package: pip install opencc") from None
    return opencc.OpenCC(f"{convert}").convert


_SEPARATOR = "\x1e"  # ASCII record separator: in no conversion phrase, so converting joined texts converts each


def convert_all(convert: Callable[[str], str], texts: list[str]) -> list[str]:
    """`[convert(t) for t in texts]`, in one call where the texts can be joined (OpenCC: about twice as fast)."""
    if len(texts) < 2:
        return [convert(t) for t in texts]
    joined = _SEPARATOR.join(texts)
    if joined.count(_SEPARATOR) == len(texts) - 1:
        out = convert(joined).split(_SEPARATOR)
        if len(out) == len(texts):
            return out
    return [convert(t) for t in texts]


class TextSource:
    """How the documents of a file are made: key or template, conversion, bad-line policy, .txt mode, and the
    conditioning header (`lingmao.data.condition`) put before each text."""

    def __init__(self, text_key: str = "text", template: str | None = None, convert: str = "none",
                 on_bad_line: str = "error", txt_mode: str = "block", condition: Conditioning | None = None) -> None:
        self.text_key = text_key
        self.template = template or None
        self.convert = convert or "none"
        self.on_bad_line = on_bad_line
        self.txt_mode = txt_mode
        self.condition = condition
        if condition is not None and self.template:
            raise LingmaoError("data.condition and data.template: choose one (the header carries the title)")
        self._converter = make_converter(self.convert)

    @property
    def headed(self) -> bool:
        """Whether every document starts with a conditioning header."""
        return self.condition is not None

    def plain(self) -> TextSource:
        """The same documents without their headers."""
        return TextSource(self.text_key, self.template, self.convert, self.on_bad_line, self.txt_mode)

    def bodies(self, texts: list[str]) -> list[str]:
        """The texts without their headers."""
        if self.condition is None:
            return texts
        from lingmao.data.condition import BODY_MARK

        return [t.partition(BODY_MARK)[2] for t in texts]

    def __getstate__(self) -> dict[str, Any]:  # an OpenCC converter does not pickle: it is made again
        return {k: v for k, v in self.__dict__.items() if k != "_converter"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._converter = make_converter(self.convert)

    def key(self, path: Path | None = None) -> str:
        """What the documents of `path` depend on besides its bytes (part of every cache key)."""
        if path is not None and is_txt(path):
            key = ["txt", self.txt_mode, self.convert]
        else:
            key = [self.text_key, self.template, self.convert]
        if self.condition is not None:
            key.append(self.condition.key())
        return json.dumps(key)

    def chunks(self, path: Path, report: ReadReport | None = None,
               on_disk: Callable[[int], None] | None = None) -> Iterator[list[str]]:
        """The documents of `path`, converted (and with their headers), in lists (one a chunk of the file)."""
        cond = self.condition
        header = cond.raw_header if cond is not None else None
        chunks = document_chunks(path, self.text_key, self.template, self.on_bad_line, report, self.txt_mode, on_disk,
                                 header)
        if cond is not None and is_txt(path):
            chunks = ([cond.raw_header({}) + t for t in texts] for texts in chunks)
        if self._converter is not None:
            chunks = (convert_all(self._converter, texts) for texts in chunks)
        if cond is not None:
            chunks = ([cond.finish(t) for t in texts] for texts in chunks)
        return chunks

    def texts(self, path: Path, report: ReadReport | None = None) -> Iterator[str]:
        """The documents of `path`, converted, one by one."""
        for texts in self.chunks(path, report):
            yield from texts
