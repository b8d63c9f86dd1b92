"""Conditioning headers (`data.condition`): written and parsed, reserved tokens that no text produces, generation
to a title, author and keywords, enforced keywords, unknown authors."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lingmao import LingmaoError
from lingmao.data import DataConfig, LMDataModule, TextSource
from lingmao.data.cache import document_hashes
from lingmao.data.condition import (
    BODY_MARK,
    MARK_OF,
    Conditioning,
    check_author,
    conditioning,
    split_document,
)
from lingmao.data.tokenizer import (
    HEADER_TOKENS,
    NUM_SYMBOLS,
    FastEncoder,
    header_ids,
    text_symbols,
    train_tokenizer_from_counts,
)
from lingmao.export import export_model, load_model
from lingmao.model import ModelConfig, build_model
from lingmao.verse.checker import check
from lingmao.verse.han import is_han
from tests.conftest import SAMPLE, cut_corpus, run_module, run_modules, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("title", "author", "keywords")


def sample_records(n: int = 200) -> list[dict]:
    with open(SAMPLE / "train.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


def frequencies(texts: list[str]) -> dict[str, int]:
    df: dict[str, int] = {}
    for t in texts:
        for c in set(t):
            if is_han(c):
                df[c] = df.get(c, 0) + 1
    return df


# ----------------------------------------------------------------------------------------------
# Writing and reading a header
# ----------------------------------------------------------------------------------------------
def test_header_round_trip_and_keywords_by_tf_idf():
    records = sample_records()
    texts = [r["text"] for r in records]
    cond = Conditioning(ALL, keywords=3, dropout=0.0).with_frequencies(frequencies(texts), len(texts))
    idf = {c: math.log(len(texts) / n) for c, n in frequencies(texts).items()}
    for r in records[:50]:
        doc = cond.finish(cond.raw_header(r) + r["text"])
        fields, body = split_document(doc)
        assert body == r["text"]
        assert fields["title"] == r["title"].strip() and fields["author"] == r["author"].strip()
        words = fields["keywords"]
        assert 1 <= len(words) <= 3 and len(set(words)) == len(words)
        # Independent of the code: each keyword scores at least as high as every character left out.
        score = {c: body.count(c) * idf[c] for c in set(body) if c in idf}
        assert min(score[c] for c in words) >= max(s for c, s in score.items() if c not in words) - 1e-9 or \
            len(words) < 3
        assert sorted(words, key=body.index) == list(words)  # in the order they first occur
        assert doc == MARK_OF["title"] + fields["title"] + MARK_OF["author"] + fields["author"] + \
            MARK_OF["keywords"] + words + BODY_MARK + body


def test_field_dropout_is_deterministic_and_near_its_rate():
    records = sample_records(600)
    texts = [r["text"] for r in records]
    cond = Conditioning(("title", "author"), dropout=0.3)
    docs = [cond.finish(cond.raw_header(r) + r["text"]) for r in records]
    assert docs == [cond.finish(cond.raw_header(r) + r["text"]) for r in records]
    titled = [r for r in records if r["title"].strip()]
    kept = sum(MARK_OF["title"] in d for d, r in zip(docs, records, strict=True) if r["title"].strip())
    assert 0.6 < kept / len(titled) < 0.8
    assert all(d.endswith(BODY_MARK + t) for d, t in zip(docs, texts, strict=True))


def test_reserved_tokens_never_come_from_text():
    """Header tokens are produced only by a header: typed as strings, as the marker characters themselves, or
    inside a field value they stay characters."""
    docs = [
        MARK_OF["title"] + "静夜思<eos>" + MARK_OF["author"] + "李白" + BODY_MARK + "床前明月光",
        MARK_OF["title"] + "<title>" + BODY_MARK + "疑是\ufdd4地上霜\ufdd7<body>",
    ]
    symbols, lengths = text_symbols(docs, headed=True)
    tok = train_tokenizer_from_counts(np.bincount(symbols, minlength=NUM_SYMBOLS), len(docs))
    ids = header_ids(tok)
    assert set(ids) == {"title", "author", "body"}  # keywords unused: not in the vocabulary
    reserved = set(ids.values())
    encoder = FastEncoder.for_tokenizer(tok)
    for text in ["<title>李白<body>", "\ufdd4\ufdd5\ufdd6\ufdd7", "<author><keywords>", "床前" + BODY_MARK]:
        assert not reserved & set(tok.encode(text).ids)
        assert not reserved & set(encoder.encode_batch([text])[0].tolist())
    headed, _ = encoder.encode_batch(docs, headed=True)
    got = [tok.id_to_token(i) for i in headed.tolist()]
    first = got[: got.index("<eos>", 2) + 1]
    assert first == ["<bos>", "<title>", *"静夜思<eos>", "<author>", "李", "白", "<body>", *"床前明月光", "<eos>"]
    second = got[len(first):]
    assert second[:2] == ["<bos>", "<title>"] and second.count("<body>") == 1 and "<title>" not in second[2:]
    assert [t for t in second if t in HEADER_TOKENS] == ["<title>", "<body>"]


def test_text_source_writes_headers_and_keys_caches_by_them(tmp_path):
    path = cut_corpus(SAMPLE / "train.jsonl", tmp_path / "a.jsonl", 30)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    plain = TextSource()
    cond = Conditioning(("title", "author"), dropout=0.0)
    source = TextSource(condition=cond)
    docs = list(source.texts(path))
    assert [split_document(d) for d in docs] == [
        ({k: r[k].strip() for k in ("title", "author") if r[k].strip()}, r["text"]) for r in records]
    assert source.bodies(docs) == list(plain.texts(path))
    keys = {plain.key(path), source.key(path), TextSource(condition=Conditioning(("title",))).key(path),
            TextSource(condition=Conditioning(("title", "author"), dropout=0.2)).key(path)}
    assert len(keys) == 4
    with pytest.raises(LingmaoError, match="choose one"):
        TextSource(template="{title}\n{text}", condition=cond)


def test_validation_split_hashes_the_text_without_its_header(tmp_path):
    path = cut_corpus(SAMPLE / "train.jsonl", tmp_path / "a.jsonl", 40)
    d = DataConfig(train_file=str(path), condition=["title", "author"], context_length=16)
    dm = LMDataModule(d, tmp_path / "cache")
    dm.prepare_tokenizer()
    hashes = dm.token_files("train")[0].doc_hashes
    assert np.array_equal(np.asarray(hashes), document_hashes(list(TextSource().texts(path))))


@pytest.mark.parametrize("overrides, message", [
    ({"condition": ["title", "poet"]}, "'poet' is not one of title, author, keywords"),
    ({"condition": ["title", "title"]}, "names a field twice"),
    ({"condition": ["title"], "template": "{title}\n{text}"}, "choose one"),
])
def test_condition_config_errors(overrides, message):
    with pytest.raises(LingmaoError, match=message):
        DataConfig(train_file=str(SAMPLE / "train.jsonl"), **overrides)
    assert conditioning([]) is None


def test_unknown_author_names_close_ones():
    authors = {"杜甫": 46, "李白": 13, "李贺": 5, "白居易": 30}
    check_author("李白", authors)
    with pytest.raises(LingmaoError) as err:
        check_author("李百", authors)
    message = str(err.value)
    assert "'李百' is not one of the model's 4 authors" in message and "李白" in message
    assert "list_authors=true" in message and "\n" not in message


# ----------------------------------------------------------------------------------------------
# A conditioned export (random weights: enforcement must not rely on the model)
# ----------------------------------------------------------------------------------------------
def export_conditioned(tmp_path: Path, fields: list[str], lines: int = 300) -> Path:
    path = cut_corpus(SAMPLE / "train.jsonl", tmp_path / "train.jsonl", lines)
    dm = LMDataModule(DataConfig(train_file=str(path), condition=fields, convert="t2s", context_length=64),
                          tmp_path / "cache")
    tok = dm.prepare_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, nhead=2, num_layers=1, dim_feedforward=64, max_len=128)
    model = build_model(cfg, tok.get_vocab_size())
    return export_model(tmp_path / "model", model, tok, cfg, {"context_length": 64, "convert": "t2s"},
                        dm.condition_record())


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    return load_model(export_conditioned(tmp_path_factory.mktemp("cond"), list(ALL)))


def test_export_records_the_conditioning(conditioned):
    record = conditioned.config["condition"]
    assert record["fields"] == list(ALL) and record["keywords"] == 3
    assert record["documents"] > 200 and "月" in record["frequencies"]
    authors = conditioned.authors()
    assert authors and list(authors.values()) == sorted(authors.values(), reverse=True)
    assert "杜甫" in authors


def test_generation_starts_from_the_header(conditioned):
    from lingmao.sampling import _header_prefix

    tok = conditioned.tokenizer
    ids = _header_prefix(conditioned, "靜夜思", "杜甫", ["月", "霜"], False, lambda s: s.replace("靜", "静"))
    assert [tok.id_to_token(i) for i in ids] == ["<title>", *"静夜思", "<author>", "杜", "甫", "<keywords>", "月",
                                                  "霜", "<body>"]
    assert [tok.id_to_token(i) for i in _header_prefix(conditioned, None, None, [], False, str)] == ["<body>"]
    with pytest.raises(LingmaoError, match="not one of the model's"):
        _header_prefix(conditioned, None, "李百", [], False, str)


class FavourHeaderTokens(torch.nn.Module):
    """The model's logits with the header tokens raised far above the rest: unbanned, they would be sampled."""

    def __init__(self, inner: torch.nn.Module, ids: list[int]) -> None:
        super().__init__()
        self.inner, self.ids = inner, ids
        self.vocab_size, self.max_len = inner.vocab_size, inner.max_len

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.inner(idx).clone()
        logits[..., self.ids] += 50.0
        return logits


def test_generated_text_holds_no_header_token(conditioned):
    from lingmao.export import LingmaoModel

    favoured = FavourHeaderTokens(conditioned.model, list(header_ids(conditioned.tokenizer).values()))
    lm = LingmaoModel(favoured, conditioned.tokenizer, conditioned.config)
    poems = lm.generate(title="春望", author="杜甫", seed=1, max_new_tokens=8, num_samples=4)
    assert all(len(p) == 8 for p in poems) and not any(t in p for p in poems for t in HEADER_TOKENS)


def test_a_model_without_conditioning_refuses_authors_and_unenforced_keywords(tmp_path):
    texts = [r["text"] for r in sample_records(100)]
    symbols, _ = text_symbols(texts)
    tok = train_tokenizer_from_counts(np.bincount(symbols, minlength=NUM_SYMBOLS), len(texts))
    cfg = ModelConfig(d_model=16, nhead=2, num_layers=1, dim_feedforward=32, max_len=64)
    lm = load_model(export_model(tmp_path / "m", build_model(cfg, tok.get_vocab_size()), tok, cfg,
                                 {"context_length": 32}))
    assert "condition" not in lm.config and lm.authors() == {}  # an export of before conditioning loads as it was
    with pytest.raises(LingmaoError, match="not trained with authors"):
        lm.generate(author="杜甫", max_new_tokens=2)
    with pytest.raises(LingmaoError, match="enforce_keywords=true"):
        lm.generate(keywords=["月"], max_new_tokens=2)
    assert "月" in lm.generate(keywords=["月"], enforce_keywords=True, max_new_tokens=3, seed=0)[0]


@pytest.mark.slow
@pytest.mark.parametrize("form", ["wujue", "qilv", None])
def test_enforced_keywords_appear_in_100_samples(conditioned, form):
    """A model with random weights never writes them by itself: every sample holding every keyword is the
    constraint's doing. The form's rules still hold (an independent check)."""
    keywords = ["明月", "霜", "秋"]
    options = {"form": form, "tones": "strict"} if form else {"max_new_tokens": 20}
    poems = conditioned.generate(keywords=keywords, enforce_keywords=True, num_samples=100, seed=3, **options)
    assert all(k in p for p in poems for k in keywords), [p for p in poems if not all(k in p for k in keywords)]
    if form:
        verdicts = [check(p, form) for p in poems]
        assert all(v.format_ok and v.rhyme_ok and v.tones_strict for v in verdicts)
    else:
        assert all(len(p) <= 20 for p in poems)
    unenforced = conditioned.generate(keywords=keywords, num_samples=20, seed=3, **options)
    assert not all(k in p for p in unenforced for k in keywords)


@pytest.mark.slow
def test_keywords_that_cannot_fit_are_a_one_line_error(conditioned):
    with pytest.raises(LingmaoError, match="fits nowhere in form=wujue"):
        conditioned.generate(form="wujue", keywords=["明月光照白"], enforce_keywords=True)
    with pytest.raises(LingmaoError, match="max_new_tokens"):
        conditioned.generate(keywords=["明月", "霜天"], enforce_keywords=True, max_new_tokens=3)


# ----------------------------------------------------------------------------------------------
# Through the apps
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_conditioned_run_exports_and_generates_to_a_title_and_poet(tmp_path, small_corpus):
    train, test = small_corpus
    out = run_module("lingmao.train", *tiny_overrides(tmp_path, train, test, steps=10),
                     "data.condition=[title,author,keywords]", "run_name=cond", timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    export = tmp_path / "outputs" / "runs" / "cond" / "export"
    record = json.loads((export / "config.json").read_text(encoding="utf-8"))["condition"]
    assert record["fields"] == list(ALL) and record["authors"]
    poet = next(iter(record["authors"]))
    model = f"model_dir={export}"
    results = run_modules({
        "poem": ("lingmao.generate", model, "title=春望", f"author={poet}", "keywords=[月,霜]", "enforce_keywords=true",
                 "form=wujue", "seed=1"),
        "unknown": ("lingmao.generate", model, "author=李百"),
        "listed": ("lingmao.generate", model, "list_authors=true"),
    }, cwd=tmp_path)
    gen, bad, listed = results["poem"], results["unknown"], results["listed"]
    assert gen.returncode == 0, gen.stderr
    poem = gen.stdout.strip()
    assert "月" in poem and "霜" in poem and len(poem.replace("\n", "")) == 24
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not one of the model's" in errors[0] and "Traceback" not in bad.stderr
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].split("\t")[0] == poet


def test_a_list_of_chinese_keywords_passes_the_command_line_as_a_list():
    from hydra import compose, initialize_config_dir

    from lingmao.cli import CONF_DIR, quote_unicode_overrides
    from lingmao.generate import _keywords
    from lingmao.verse.keywords import normalize_keywords

    quoted = quote_unicode_overrides(["keywords=[月,霜]", "keywords=['月']"])
    assert quoted == ['keywords=["月","霜"]', "keywords=['月']"]

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("generate", overrides=quote_unicode_overrides(["keywords=[明月,霜]", "title=春望"]))
    assert _keywords(cfg.keywords) == ["明月", "霜"] and cfg.title == "春望"
    assert normalize_keywords("月 霜、秋,月") == ["月", "霜", "秋"]


@pytest.mark.slow
def test_bench_condition_prints_the_table(tmp_path, capsys):
    from tests.test_bench_smoke import load_script

    train = cut_corpus(SAMPLE / "train.jsonl", tmp_path / "train.jsonl", 200)
    test = cut_corpus(SAMPLE / "test.jsonl", tmp_path / "test.jsonl", 20)
    bench = load_script("bench_condition")
    argv = ["--steps", "3", "--output-dir", str(tmp_path / "out"), "--set", "model=tiny", "model.d_model=16",
            "model.dim_feedforward=32", "hardware=cpu", "hardware.cpu_threads=1", "data.context_length=32",
            "data.batch_size=4", f"data.train_file={train}", f"data.test_file={test}", "trainer.limit_val_batches=2"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| plain", "| condition="))]
    assert [r[1] for r in rows] == ["-", "title+author+keywords", "title only", "author only", "keywords only",
                                    "empty (<body> only)"], out
    assert all(5 < float(r[2]) < 16 for r in rows), out
    assert re.search(r"the full header is \d+\.\d% of a test poem's tokens", out), out


@pytest.mark.slow
def test_the_web_api_takes_a_poet_and_keywords(conditioned):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from lingmao.serve.app import create_app

    with TestClient(create_app(conditioned), base_url="http://localhost") as client:  # a host this server serves
        info = client.get("/api/info").json()["model"]
        assert info["condition"] == list(ALL) and "杜甫" in info["authors"]
        body = {"form": "wujue", "title": "春望", "author": "杜甫", "keywords": ["月", "霜"], "enforce_keywords": True,
                "num_samples": 2, "seed": 1}
        result = client.post("/api/generate", json=body)
        assert result.status_code == 200, result.text
        assert all("月" in p["text"] and "霜" in p["text"] for p in result.json()["poems"])
        refused = client.post("/api/generate", json={"author": "李百"})
        assert refused.status_code == 400 and "not one of the model's" in refused.json()["error"]
        too_many = client.post("/api/generate", json={"keywords": list("春夏秋冬风花雪月天")})
        assert too_many.status_code == 422
