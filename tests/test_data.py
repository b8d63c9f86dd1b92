import gzip
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

from lingmao.data import (
    DataConfig,
    LMDataModule,
    TextSource,
    TokenFile,
    WindowDataset,
    iter_documents,
    load_or_tokenize,
)
from lingmao.data.tokenizer import load_tokenizer, save_tokenizer, special_ids, train_tokenizer
from lingmao.errors import LingmaoError


@pytest.fixture
def tokenizer(small_corpus):
    train, _ = small_corpus
    return train_tokenizer(iter_documents(train))


def test_tokenizer_round_trip_and_specials(small_corpus, tokenizer, tmp_path):
    train, _ = small_corpus
    text = next(iter_documents(train))
    ids = tokenizer.encode(text).ids
    ids_ = special_ids(tokenizer)
    assert ids[0] == ids_["bos"] and ids[-1] == ids_["eos"]
    assert len(ids) == len(text) + 2  # one token per character, newlines and punctuation included
    assert tokenizer.decode(ids) == text
    assert ids_["pad"] == 0
    assert tokenizer.encode("\U0001f600", add_special_tokens=False).ids == [ids_["unk"]]
    save_tokenizer(tokenizer, tmp_path / "tok.json")
    assert load_tokenizer(tmp_path / "tok.json").encode(text).ids == ids


def test_gz_reads_like_plain(small_corpus, tmp_path):
    train, _ = small_corpus
    gz = tmp_path / "train.jsonl.gz"
    gz.write_bytes(gzip.compress(train.read_bytes()))
    assert list(iter_documents(gz)) == list(iter_documents(train))


def test_template_and_text_key(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"title": "静夜思", "body": "床前明月光"}\n', encoding="utf-8")
    assert list(iter_documents(f, text_key="body")) == ["床前明月光"]
    assert list(iter_documents(f, template="{title}\n{body}")) == ["静夜思\n床前明月光"]


def test_convert_t2s(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "函谷壯皇居"}\n', encoding="utf-8")
    assert list(TextSource(convert="t2s").texts(f)) == ["函谷壮皇居"]


def flat(n: int, doc_lengths: list[int] | None = None) -> TokenFile:
    doc_lengths = doc_lengths or [n]
    offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
    return TokenFile.from_ids(np.arange(offsets[-1], dtype=np.uint16), offsets)


@pytest.mark.parametrize(
    "n,context,stride,expected", [(100, 10, 10, 9), (100, 10, 1, 90), (11, 10, 5, 1), (10, 10, 1, 0)]
)
def test_stride_arithmetic(n, context, stride, expected):
    ds = WindowDataset(flat(n), context, stride)
    assert len(ds) == expected
    if expected:
        x, y = ds[len(ds) - 1]
        assert x.shape == (context,) and torch_equal(y[:-1], x[1:])
        assert int(y[-1]) <= n - 1  # the last window stays inside the array


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_windows_are_shifted_by_one():
    ds = WindowDataset(flat(50), 8, 3)
    x, y = ds[2]
    assert x.tolist() == list(range(6, 14)) and y.tolist() == list(range(7, 15))


def test_packing_off_keeps_windows_inside_documents():
    data = flat(0, [5, 30, 12, 3])
    packed = WindowDataset(data, 10, 10, packing=True)
    unpacked = WindowDataset(data, 10, 10, packing=False)
    assert len(packed) == (50 - 11) // 10 + 1
    # doc of 30 tokens: starts 5, 15 (25 would need 36 > 35); doc of 12: start 35; the others are too short.
    assert [unpacked.start(i) for i in range(len(unpacked))] == [5, 15, 35]
    assert unpacked.too_short == 2
    for i in range(len(unpacked)):
        s = unpacked.start(i)
        doc = int(np.searchsorted(data.doc_offsets, s, side="right")) - 1
        assert s + 11 <= data.doc_offsets[doc + 1]


def test_cache_hit_on_second_load(small_corpus, tokenizer, tmp_path, caplog):
    train, _ = small_corpus
    cache = tmp_path / "cache"
    first = load_or_tokenize(train, tokenizer, TextSource(), cache)
    (entry,) = cache.iterdir()  # one folder for the file, complete (no temporary names left)
    assert sorted(p.name for p in entry.iterdir()) == [
        "alphabet.npy", "counts.npy", "docs.bin", "meta.json", "symbols.bin"]
    with caplog.at_level(logging.INFO, logger="lingmao.data"):
        second = load_or_tokenize(train, tokenizer, TextSource(), cache)
    assert "token cache hit" in caplog.text and "tokenized" not in caplog.text
    assert isinstance(second.symbols, np.memmap)
    assert np.array_equal(first.ids(), second.ids()) and np.array_equal(first.doc_offsets, second.doc_offsets)
    expected = [tokenizer.encode(t).ids for t in iter_documents(train)]
    assert second.ids().tolist() == [i for ids in expected for i in ids]
    # Another text setting is another cache entry, not a stale hit.
    converted = load_or_tokenize(train, tokenizer, TextSource(convert="t2s"), cache)
    assert len(list(cache.iterdir())) == 2 and not np.array_equal(converted.ids(), first.ids())


def test_cache_ignores_a_damaged_entry(small_corpus, tokenizer, tmp_path):
    train, _ = small_corpus
    cache = tmp_path / "cache"
    good = load_or_tokenize(train, tokenizer, TextSource(), cache).ids()
    symbols = next(cache.glob("*/symbols.bin"))
    damaged = symbols.read_bytes()[:100]
    symbols.unlink()  # a new file: the old one may still be memory-mapped
    symbols.write_bytes(damaged)
    again = load_or_tokenize(train, tokenizer, TextSource(), cache)
    assert np.array_equal(good, again.ids())


def test_memory_is_two_bytes_a_token_whatever_the_stride(small_corpus, tokenizer, tmp_path):
    """Tokens are read from the mapped cache file, 2 bytes each; a dataset holds no window or token copy:
    pickled (as loader workers get it) it is the same few KB at stride 1 as at stride 64."""
    train, _ = small_corpus
    data = load_or_tokenize(train, tokenizer, TextSource(), tmp_path / "cache")
    mapped = Path(data.symbols.filename)
    assert mapped.stat().st_size == 2 * data.num_tokens
    sizes = {stride: len(pickle.dumps(WindowDataset(data, 64, stride))) for stride in (1, 7, 64)}
    windows = len(WindowDataset(data, 64, 1))
    # A copy of the tokens would take 2 bytes a token, the windows' starts 8 bytes a window (one a token here).
    assert windows == data.num_tokens - 64 and max(sizes.values()) < data.num_tokens, sizes
    restored = pickle.loads(pickle.dumps(WindowDataset(data, 64, 1)))
    assert torch_equal(restored[windows - 1][0], WindowDataset(data, 64, 1)[windows - 1][0])


def test_datamodule_loaders(small_corpus, tmp_path):
    train, test = small_corpus
    cfg = DataConfig(train_file=str(train), test_file=str(test), tokenizer_path=str(tmp_path / "tok.json"),
                     context_length=32, batch_size=4)
    dm = LMDataModule(cfg, cache_dir=tmp_path / "cache")
    dm.prepare_data()
    dm.setup("fit")
    assert (tmp_path / "tok.json").is_file()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 32) and y.shape == (4, 32)
    v1 = [b[0] for b in dm.val_dataloader()]
    v2 = [b[0] for b in dm.val_dataloader()]
    assert all(torch_equal(a, b) for a, b in zip(v1, v2, strict=True))  # validation is not shuffled


def test_zero_windows_is_a_clear_error(tmp_path):
    f = tmp_path / "short.jsonl"
    f.write_text('{"text": "床前明月光"}\n', encoding="utf-8")
    dm = LMDataModule(DataConfig(train_file=str(f), tokenizer_path=str(tmp_path / "tok.json"), context_length=64,
                                 batch_size=1))
    with pytest.raises(LingmaoError, match=r"short.jsonl.*no window.*1 documents, 7 tokens"):
        dm.setup("fit")


# ----------------------------------------------------------------------------------------------
# DataConfig: the data keys, their ranges, the checks of the files they name
# ----------------------------------------------------------------------------------------------
def test_data_config_from_the_composed_config_and_its_checks(conf_dir, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        cfg = compose("train")
    d = DataConfig.of(cfg.data)
    assert d.val_fraction == 0.02 and d.txt_mode == "block" and Path(d.train_file).is_file()
    d.check()  # the bundled corpus is there
    with pytest.raises(LingmaoError, match=r"^data.val_fraction=1.0: out of range; allowed: a number in \[0, 1\)$"):
        DataConfig(train_file="a.jsonl", val_fraction=1.0)
    with pytest.raises(LingmaoError, match=r"^data.txt_mode='lines': not allowed; allowed: one of block, file$"):
        DataConfig(train_file="a.jsonl", txt_mode="lines")
    with pytest.raises(LingmaoError, match=r"data.template='\{0\}': use named fields"):
        DataConfig(train_file="a.jsonl", template="{0}")
    with pytest.raises(LingmaoError, match=r"data.train_file: a value is required"):
        DataConfig()
    with pytest.raises(LingmaoError, match="data.nope: unknown key"):
        DataConfig.of({"train_file": "a.jsonl", "nope": 1})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LingmaoError) as info:
        DataConfig(train_file="a.jsonl", test_file=["b.jsonl", "c/*.txt"]).check()
    assert str(info.value) == (
        f"data.train_file: a.jsonl: file not found (relative to {tmp_path}); "
        f"data.test_file: b.jsonl: file not found (relative to {tmp_path}); "
        f"data.test_file: c/*.txt: matches no file (relative to {tmp_path})"
    )
