"""A validation split that is not the test split: held out of training, stable, and the test file unread by fit."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lingmao.config import CONF_DIR
from lingmao.data import DataConfig, LMDataModule, iter_documents
from lingmao.errors import LingmaoError
from tests.conftest import SAMPLE, cut_corpus, run_module, tiny_overrides

ROOT = Path(__file__).resolve().parent.parent


def corpus_with_repeats(path: Path, n: int = 300, repeats: int = 60) -> list[str]:
    """`n` poems, then `repeats` of them again (same text, another title): a text must not be on both sides."""
    docs = list(iter_documents(SAMPLE / "train.jsonl"))[:n]
    docs += docs[:: n // repeats][:repeats]
    path.write_text("".join(json.dumps({"text": d, "title": str(i)}, ensure_ascii=False) + "\n"
                            for i, d in enumerate(docs)), encoding="utf-8")
    return docs


def datamodule(train: Path, tmp_path: Path, **options) -> LMDataModule:
    cfg = DataConfig(train_file=str(train), tokenizer_path=str(tmp_path / "tok.json"), context_length=16,
                     batch_size=2, **options)
    dm = LMDataModule(cfg, cache_dir=tmp_path / "cache")
    dm.setup("fit")
    return dm


def stream(dm: LMDataModule, which: str) -> list[int]:
    ds = getattr(dm, f"{which}_set")
    return ds.tokens(0, ds.num_tokens).tolist()


def test_validation_documents_are_held_out_of_training(tmp_path):
    docs = corpus_with_repeats(tmp_path / "train.jsonl")
    dm = datamodule(tmp_path / "train.jsonl", tmp_path, val_fraction=0.2)
    tok = dm.tokenizer
    # Which documents each side holds, read back from the tokens the datasets actually serve.
    encoded = [tok.encode(d).ids for d in docs]
    train_stream, val_stream = stream(dm, "train"), stream(dm, "val")
    by_text = {tuple(ids): d for ids, d in zip(encoded, docs, strict=True)}
    train_docs, val_docs = split_documents(train_stream, tok), split_documents(val_stream, tok)
    train_texts = {by_text[tuple(ids)] for ids in train_docs}
    val_texts = {by_text[tuple(ids)] for ids in val_docs}
    assert val_texts and not train_texts & val_texts
    assert len(train_docs) + len(val_docs) == len(docs)  # every document on exactly one side
    assert 0.1 < len(val_docs) / len(docs) < 0.3
    # Bits per character of validation: tokens per character of exactly those documents.
    val_chars = sum(len(by_text[tuple(ids)]) for ids in val_docs)
    assert dm.val_set.tokens_per_char == pytest.approx(len(val_stream) / val_chars)


def split_documents(tokens: list[int], tok) -> list[list[int]]:
    """A token stream cut after every <eos>."""
    eos = tok.token_to_id("<eos>")
    docs, current = [], []
    for t in tokens:
        current.append(t)
        if t == eos:
            docs.append(current)
            current = []
    assert not current
    return docs


SPLIT_SCRIPT = """
import json, sys
from lingmao.data import DataConfig, LMDataModule
cfg = DataConfig(train_file=sys.argv[1], tokenizer_path=sys.argv[2], context_length=16, batch_size=2, val_fraction=0.2)
dm = LMDataModule(cfg, cache_dir=sys.argv[3])
dm.setup("fit")
print(json.dumps(dm.val_set.tokens(0, dm.val_set.num_tokens).tolist()))
"""


@pytest.mark.slow
def test_the_validation_split_is_the_same_in_every_run(tmp_path):
    corpus_with_repeats(tmp_path / "train.jsonl")
    here = datamodule(tmp_path / "train.jsonl", tmp_path, val_fraction=0.2)
    # Another interpreter, with another string hashing and its own caches, chooses the same documents.
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    out = run_module("-c", SPLIT_SCRIPT, str(tmp_path / "train.jsonl"), str(tmp_path / "tok.json"),
                     str(tmp_path / "other_cache"), env={"PYTHONHASHSEED": seed}, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there == stream(here, "val") and len(there) > 100


def test_an_empty_validation_split_is_said_and_skipped(tmp_path, caplog):
    cut_corpus(SAMPLE / "train.jsonl", tmp_path / "train.jsonl", 40)
    with caplog.at_level(logging.WARNING, logger="lingmao.data"):
        dm = datamodule(tmp_path / "train.jsonl", tmp_path, val_fraction=1e-6)
    assert dm.val_set is None and dm.val_dataloader() == []
    assert "data.val_fraction=1e-06 of the 40 training documents chose none; no validation" in caplog.text
    assert dm.train_set.num_documents == 40


def test_a_split_that_takes_every_document_is_an_error(tmp_path):
    (tmp_path / "one.jsonl").write_text('{"text": "床前明月光"}\n', encoding="utf-8")
    with pytest.raises(LingmaoError, match=r"one.jsonl: all 1 documents fell into the validation split"):
        datamodule(tmp_path / "one.jsonl", tmp_path, val_fraction=0.999999)


def test_a_validation_file_keeps_every_training_document(small_corpus, tmp_path):
    train, other = small_corpus
    dm = datamodule(train, tmp_path, val_file=str(other))
    assert dm.train_set.num_documents == 400 and dm.val_set.num_documents == 60


# ----------------------------------------------------------------------------------------------
# A real run: fit never opens the test file; the final test does
# ----------------------------------------------------------------------------------------------
_opened: list[str] | None = None  # while a test records: the paths opened, and markers


def _record_opens(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)  # audit hooks cannot be removed: it records only while _opened is a list


@pytest.mark.slow
def test_fit_never_opens_the_test_file(small_corpus, tmp_path, monkeypatch):
    global _opened
    import lightning as L

    from lingmao.train import train

    train_file, test_file = small_corpus
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*tiny_overrides(tmp_path, train_file, test_file, steps=12), "export=false"])
    real_test = L.Trainer.test

    def test_with_marker(self, *args, **kwargs):
        _opened.append("<test begins>")
        return real_test(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "test", test_with_marker)
    _opened = []
    try:
        train(cfg)
        events = list(_opened)
    finally:
        _opened = None
    marker = events.index("<test begins>")
    before, after = events[:marker], events[marker:]
    assert str(train_file) in before  # the hook sees the files fit reads
    assert str(test_file) not in before
    assert str(test_file) in after
