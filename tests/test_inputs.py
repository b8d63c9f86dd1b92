"""Many input files: lists, directories, globs, .jsonl/.jsonl.gz/.txt read like one file; per-file caches."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from lingmao.data import (
    DataConfig,
    LMDataModule,
    TextSource,
    input_files,
    input_problems,
    iter_documents,
    load_or_tokenize,
)
from lingmao.data import reading as reading_module
from lingmao.data.tokenizer import save_tokenizer, train_tokenizer
from lingmao.errors import LingmaoError
from tests.conftest import SAMPLE


def sample_docs(n: int, start: int = 0) -> list[str]:
    """Poems of the bundled corpus that a .txt file can hold as blocks (no blank line inside)."""
    docs = [d for d in iter_documents(SAMPLE / "train.jsonl") if all(line.strip() for line in d.split("\n"))]
    return docs[start : start + n]


def jsonl(docs: list[str]) -> str:
    return "".join(json.dumps({"text": d, "title": "t"}, ensure_ascii=False) + "\n" for d in docs)


def write_parts(folder: Path, docs: list[str]) -> list[Path]:
    """The documents over three files of three formats, in name order: .jsonl, .jsonl.gz, .txt (blocks)."""
    folder.mkdir(parents=True)
    a, b, c = docs[: len(docs) // 3], docs[len(docs) // 3 : 2 * len(docs) // 3], docs[2 * len(docs) // 3 :]
    (folder / "1.jsonl").write_text(jsonl(a), encoding="utf-8")
    (folder / "2.jsonl.gz").write_bytes(gzip.compress(jsonl(b).encode()))
    # A BOM, Windows line endings, and blank lines of spaces between the blocks.
    (folder / "3.txt").write_bytes(("\ufeff\r\n" + "\r\n \r\n\r\n".join(c) + "\r\n\r\n").encode())
    return [folder / "1.jsonl", folder / "2.jsonl.gz", folder / "3.txt"]


def windows(dm: LMDataModule, which: str) -> list[list[int]]:
    ds = getattr(dm, f"{which}_set")
    return [ds[i][0].tolist() + ds[i][1][-1:].tolist() for i in range(len(ds))]


def datamodule(train, tmp_path: Path, name: str, **options) -> LMDataModule:
    cfg = DataConfig(train_file=train, tokenizer_path=str(tmp_path / f"{name}.tok.json"), context_length=16,
                     batch_size=2, **options)
    dm = LMDataModule(cfg, cache_dir=tmp_path / "cache")
    dm.setup("fit")
    return dm


def test_list_directory_glob_and_formats_read_like_one_concatenated_file(tmp_path):
    docs = sample_docs(90)
    (tmp_path / "all.jsonl").write_text(jsonl(docs), encoding="utf-8")
    files = write_parts(tmp_path / "parts", docs)
    one = datamodule(str(tmp_path / "all.jsonl"), tmp_path, "one", val_fraction=0.1)
    assert one.val_set is not None and one.train_set.num_documents + one.val_set.num_documents == 90
    inputs = {
        "list": [str(f) for f in files],
        "directory": str(tmp_path / "parts"),
        "glob": str(tmp_path / "parts" / "*"),
        "list of a file and a glob": [str(files[0]), str(tmp_path / "parts" / "[23].*")],
    }
    assert len(one.train_set) > 100 and len(one.val_set) > 5
    for name, value in inputs.items():
        many = datamodule(value, tmp_path, name.replace(" ", "_"), val_fraction=0.1)
        assert many.tokenizer.to_str() == one.tokenizer.to_str(), name
        assert windows(many, "train") == windows(one, "train"), name
        assert windows(many, "val") == windows(one, "val"), name
        assert many.val_set.tokens_per_char == one.val_set.tokens_per_char


def test_txt_blocks_and_whole_files(tmp_path):
    (tmp_path / "p.txt").write_text("\n\n靜夜思\n床前明月光\n  \n\t\n春曉\n春眠不覺曉\n", encoding="utf-8")
    assert list(iter_documents(tmp_path / "p.txt")) == ["靜夜思\n床前明月光", "春曉\n春眠不覺曉"]
    assert list(iter_documents(tmp_path / "p.txt", txt_mode="file")) == ["靜夜思\n床前明月光\n  \n\t\n春曉\n春眠不覺曉"]
    (tmp_path / "bad.txt").write_bytes("甲\n".encode() + "乙\n".encode("gb18030") + "丙\n".encode())
    with pytest.raises(LingmaoError, match=r"bad.txt:2: not UTF-8"):
        list(iter_documents(tmp_path / "bad.txt"))
    assert list(iter_documents(tmp_path / "bad.txt", on_bad_line="skip")) == ["甲\n丙"]


def test_errors_name_the_file_and_line_across_chunks(tmp_path, monkeypatch):
    """Read in chunks of a few hundred bytes, a bad line far into the file is still named by its number."""
    monkeypatch.setattr(reading_module, "CHUNK_BYTES", 300)
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in sample_docs(40)]
    lines[33] = '{"text": 7}'
    (tmp_path / "f.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(LingmaoError, match=r"f.jsonl:34: key 'text' is a int"):
        list(iter_documents(tmp_path / "f.jsonl"))
    assert len(list(iter_documents(tmp_path / "f.jsonl", on_bad_line="skip"))) == 39


def test_input_problems_are_one_line_each(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("not data")
    (tmp_path / "empty.jsonl").write_text("")
    cases = {
        str(tmp_path / "*.jsonl.gz"): "data.train_file: " + str(tmp_path / "*.jsonl.gz") + ": matches no file",
        str(tmp_path / "notes"): "is a directory with no .jsonl, .jsonl.gz, .txt, .txt.gz file in it",
        str(tmp_path / "empty.jsonl"): "empty.jsonl: the file is empty",
        "missing.jsonl": "missing.jsonl: file not found (relative to ",
    }
    for value, expected in cases.items():
        (problem,) = input_problems(value, "data.train_file")
        assert expected in problem and "\n" not in problem
    assert input_problems([], "data.train_file") == ["data.train_file: an empty list; give at least one file"]
    with pytest.raises(LingmaoError, match="matches no file"):
        input_files(str(tmp_path / "*.txt"), "data.train_file")


def test_a_changed_file_is_read_again_alone(tmp_path, caplog):
    files = write_parts(tmp_path / "parts", sample_docs(60))
    first = datamodule(str(tmp_path / "parts"), tmp_path, "first")
    entries = sorted((tmp_path / "cache" / "tokens").iterdir())
    stamps = {p.name: (p / "meta.json").stat().st_mtime_ns for p in entries}
    with files[1].open("ab") as f:  # one more poem at the end of the gzipped file (a second gzip member)
        f.write(gzip.compress(jsonl(sample_docs(1, start=70)).encode()))
    with caplog.at_level(logging.INFO, logger="lingmao.data"):
        second = datamodule(str(tmp_path / "parts"), tmp_path, "second")
    tokenized = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenized ")]
    assert len(tokenized) == 1 and tokenized[0].startswith(f"tokenized {files[1]}:"), tokenized
    assert "token cache hit for 2 of 3 files" in caplog.text
    assert {p.name: (p / "meta.json").stat().st_mtime_ns for p in entries} == stamps  # the others untouched
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 4
    docs = first.train_set.num_documents + (first.val_set.num_documents if first.val_set else 0)
    assert second.train_set.num_documents + (second.val_set.num_documents if second.val_set else 0) == docs + 1


def test_files_tokenized_in_parallel_give_the_same_tokens(tmp_path):
    files = write_parts(tmp_path / "parts", sample_docs(60))
    tok = train_tokenizer(d for f in files for d in iter_documents(f))
    alone = [load_or_tokenize(f, tok, TextSource(), tmp_path / "serial").ids() for f in files]
    save_tokenizer(tok, tmp_path / "tok.json")
    cfg = DataConfig(train_file=[str(f) for f in files], tokenizer_path=str(tmp_path / "tok.json"),
                     context_length=16, batch_size=2, num_workers=2)
    dm = LMDataModule(cfg, cache_dir=tmp_path / "parallel")
    together = [tf.ids() for tf in dm.token_files("train")]
    assert all(np.array_equal(a, b) for a, b in zip(alone, together, strict=True))


def test_more_than_65536_distinct_characters(tmp_path, monkeypatch):
    """Past 65,536 distinct symbols a cache goes from 2 to 4 bytes a token, rewriting what it had written."""
    monkeypatch.setattr(reading_module, "CHUNK_BYTES", 50_000)  # many chunks, so the switch comes midway
    chars = [chr(c) for c in (*range(0x4E00, 0xA000), *range(0x3400, 0x4DC0), *range(0x20000, 0x2A6E0))]
    docs = ["".join(chars[i : i + 700]) for i in range(0, len(chars), 700)]
    f = tmp_path / "wide.jsonl"
    f.write_text(jsonl(docs), encoding="utf-8")
    tok = train_tokenizer(docs)
    data = load_or_tokenize(f, tok, TextSource(), tmp_path / "cache")
    assert len(chars) > 1 << 16 and data.symbols.dtype == np.uint32
    assert data.ids().tolist() == [i for e in tok.encode_batch(docs) for i in e.ids]


def test_a_cache_read_with_skip_does_not_serve_a_run_that_must_stop_at_the_bad_line(tmp_path):
    docs = sample_docs(6)
    path = tmp_path / "f.jsonl"
    path.write_text(jsonl(docs[:3]) + "{oops\n" + jsonl(docs[3:]), encoding="utf-8")
    tok = train_tokenizer(docs)
    skipped = load_or_tokenize(path, tok, TextSource(on_bad_line="skip"), tmp_path / "cache")
    assert len(skipped.doc_chars) == 6
    with pytest.raises(LingmaoError, match=r"f.jsonl:4: invalid JSON"):
        load_or_tokenize(path, tok, TextSource(on_bad_line="error"), tmp_path / "cache")


def test_converted_text_is_cached_per_opencc_version(tmp_path, monkeypatch):
    """Another OpenCC release may convert some characters otherwise: its caches are its own."""
    import importlib.metadata

    from lingmao.data import cache
    from lingmao.data.datamodule import default_tokenizer_path

    path = tmp_path / "f.jsonl"
    path.write_text(jsonl(sample_docs(3)), encoding="utf-8")
    converted, plain = TextSource(convert="t2s"), TextSource()

    def keys() -> tuple:
        return (cache._entry_folder(path, converted, tmp_path, None), cache._entry_folder(path, plain, tmp_path, None),
                default_tokenizer_path(DataConfig(train_file=str(path), convert="t2s"), tmp_path),
                default_tokenizer_path(DataConfig(train_file=str(path)), tmp_path))

    before = keys()
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name == "opencc" else real(name))
    after = keys()
    assert after[0] != before[0] and after[2] != before[2]  # converted text: other token caches and tokenizers
    assert after[1] == before[1] and after[3] == before[3]  # no conversion: the OpenCC version does not matter
