"""Fuzzing the JSONL reader: whatever the bytes, it yields text or raises LingmaoError, nothing else."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lingmao.data import ReadReport, iter_documents
from lingmao.errors import LingmaoError

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
_DIR = Path(tempfile.mkdtemp(prefix="lingmao-fuzz-"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
records = st.dictionaries(st.sampled_from(["text", "title", "x", ""]), json_values, max_size=4)


def read(data: bytes, suffix: str = ".jsonl", **options) -> list[str]:
    """Write `data` to a file and read it back; returns the documents or raises."""
    path = _DIR / f"fuzz{suffix}"
    path.write_bytes(data)
    docs = list(iter_documents(path, **options))
    for doc in docs:
        assert isinstance(doc, str)
        doc.encode("utf-8")  # every document can reach the tokenizer
    return docs


def read_or_user_error(data: bytes, suffix: str = ".jsonl", **options) -> list[str] | LingmaoError:
    try:
        return read(data, suffix, **options)
    except LingmaoError as exc:
        assert "\n" not in str(exc), "the message must be one line"
        return exc


@pytest.mark.slow
@FUZZ
@given(st.binary(max_size=400))
@example(b"[" * 100_000)  # nesting deeper than the JSON parser's recursion limit
@example(b'{"text": 1' + b"0" * 5000 + b"}")  # a number longer than int() accepts
@example(b'{"text": "a\\ud800b"}')  # an unpaired surrogate escape
@example(b"\xef\xbb\xbf" + b'{"text": "a"}\r\n\xef\xbb\xbf{"text": "b"}')  # BOMs and CRLF
@example(b'{"text": "\xff"}')  # not UTF-8
def test_random_bytes_yield_text_or_lingmao_error(data: bytes) -> None:
    read_or_user_error(data)
    # With skip, a content problem is never an error: only whole-file problems may be.
    result = read_or_user_error(data, on_bad_line="skip")
    assert isinstance(result, list)


@pytest.mark.slow
@FUZZ
@given(st.binary(max_size=300), st.booleans())
def test_random_gzip_yields_text_or_lingmao_error(data: bytes, compress: bool) -> None:
    blob = gzip.compress(data) if compress else data
    read_or_user_error(blob, ".jsonl.gz")
    read_or_user_error(blob[: max(1, len(blob) // 2)], ".jsonl.gz")  # truncated


@pytest.mark.slow
@FUZZ
@given(st.lists(records | json_values, max_size=6), st.sampled_from([None, "{title}\n{text}", "{x[0]}", "{text.y}"]))
def test_random_json_lines(lines: list, template: str | None) -> None:
    data = "\n".join(json.dumps(line, ensure_ascii=bool(len(lines) % 2)) for line in lines).encode("utf-8", "replace")
    result = read_or_user_error(data, template=template)
    report = ReadReport()
    docs = list(iter_documents(_DIR / "fuzz.jsonl", template=template, on_bad_line="skip", report=report))
    good = [r for r in lines if isinstance(r, dict) and isinstance(r.get("text"), str)] if template is None else None
    if good is not None:
        assert len(docs) == len([g for g in good if _encodable(g["text"])])
    assert report.documents == len(docs)
    if isinstance(result, list):
        assert result == docs and report.skipped == 0
    else:
        assert report.skipped >= 1


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_long_single_line_is_read(tmp_path: Path, suffix: str) -> None:
    """A 100 MB line (one huge document) is read, not refused."""
    text = "床前明月光疑是地上霜" * 3_500_000  # 35 M characters, 105 MB of UTF-8
    data = json.dumps({"text": text}, ensure_ascii=False).encode()
    assert len(data) > 100_000_000
    path = tmp_path / f"big{suffix}"
    path.write_bytes(gzip.compress(data, compresslevel=1) if suffix.endswith(".gz") else data)
    docs = list(iter_documents(path))
    assert len(docs) == 1 and len(docs[0]) == len(text)
