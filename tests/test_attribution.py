"""The author-attribution classifier, on the bundled sample's poets, and the bench script that uses it."""

from __future__ import annotations

import functools
import json
import re
from collections import Counter

import pytest

from lingmao.attribution import (
    AuthorClassifier,
    _matrix,
    accuracy,
    balanced_weights,
    features,
    objective,
    top_authors,
)
from tests.conftest import SAMPLE

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=2)
def records(split: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_features_and_top_authors():
    assert features("明月松间照，清泉石上流。") == Counter(
        {**dict.fromkeys("明月松间照清泉石上流", 1), "明月": 1, "月松": 1, "松间": 1, "间照": 1,
         "清泉": 1, "泉石": 1, "石上": 1, "上流": 1})  # no pair across the comma
    names = top_authors((r.get("author") for r in records("train")), 20)
    assert top_authors([r.get("author") for r in records("train")], 4) == ["白居易", "杜甫", "李白", "元稹"]
    assert "无名氏" not in names and "不詳" not in names  # 158 and 88 poems, but nobody's
    assert accuracy(["a", "a", "b"], ["a", "b", "b"]) == (pytest.approx(2 / 3), pytest.approx(0.75))


def test_the_written_out_gradient_is_autograds():
    import torch

    texts = [r["text"] for r in records("train")[:40]]
    counted = [features(t) for t in texts]
    columns = {f: i for i, f in enumerate(sorted({f for c in counted for f in c}))}
    x = _matrix(counted, columns)
    torch.manual_seed(0)
    weight, bias = torch.randn(len(columns), 3, requires_grad=True), torch.randn(3, requires_grad=True)
    y, sample_weight = torch.randint(0, 3, (40,)), torch.rand(40)
    loss, grad_w, grad_b = objective(weight, bias, x, x.t().coalesce(), y, sample_weight, 0.1)
    logits = torch.sparse.mm(x, weight) + bias
    reference = (torch.nn.functional.cross_entropy(logits, y, reduction="none") * sample_weight).sum()
    (reference + 0.1 * weight.pow(2).sum()).backward()
    assert float(loss) == pytest.approx(float((reference + 0.1 * weight.pow(2).sum()).detach()), rel=1e-5)
    assert torch.allclose(grad_w, weight.grad, atol=1e-6) and torch.allclose(grad_b, bias.grad, atol=1e-6)
    # Each poet weighs alike however many poems: 293 of 白居易 and 88 of 劉禹錫 alike.
    y = torch.tensor([0] * 293 + [1] * 88 + [2])
    assert torch.allclose(torch.zeros(3).index_add_(0, y, balanced_weights(y, 3)), torch.full((3,), 1 / 3))


@pytest.mark.slow
def test_the_classifier_names_held_out_poets_far_above_chance():
    """Five poets of the sample (293 to 88 training poems): their 50 held-out poems, which it never saw."""
    train, test = records("train"), records("test")
    poets = top_authors([r.get("author") for r in train], 5)
    fit = [r for r in train if r.get("author") in poets]
    held = [r for r in test if r.get("author") in poets]
    clf = AuthorClassifier.fit([r["text"] for r in fit], [r["author"] for r in fit], max_iter=100)
    assert sorted(clf.authors) == sorted(poets)
    acc, balanced = accuracy(clf.predict([r["text"] for r in held]), [r["author"] for r in held])
    assert len(held) == 50 and balanced > 0.4 and acc > 0.5, (acc, balanced)  # chance: 0.2
    # Its own training poems it mostly gets right, each poet's alike (the classes are weighted equally).
    own = accuracy(clf.predict([r["text"] for r in fit]), [r["author"] for r in fit])
    assert own[1] > 0.9, own
    scores = clf.scores(["", "春"])
    assert scores.shape == (2, 5) and float(scores[0].exp().sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one author per text"):
        AuthorClassifier.fit(["春"], [])


@pytest.mark.slow
def test_bench_poems_prints_its_tables(tmp_path, capsys):
    """The bench on the bundled sample: the classifier's table; on a tiny export that takes no author=, author
    control is skipped with the reason; the copying table compares the two settings."""
    import torch

    from lingmao import export_model
    from lingmao.data.tokenizer import train_tokenizer
    from lingmao.model import ModelConfig, build_model
    from lingmao.verse.lines import LineSet
    from tests.test_bench_smoke import load_script

    bench = load_script("bench_poems")
    assert bench.main(["--poets", "5"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| held-out balanced accuracy \(chance 20\.0%\) \| \d+\.\d% \|", out), out
    texts = [r["text"] for r in records("train")[:300]]
    tok = train_tokenizer(texts)
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=16, nhead=2, num_layers=1, dim_feedforward=32), tok.get_vocab_size())
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), "utf-8")
    export_model(tmp_path / "m", model, tok, model.config, {"context_length": 32},
                 lines=LineSet.from_texts(texts, [str(train_file)]))
    argv = ["--poets", "3", "--model-dir", str(tmp_path / "m"), "--per-poet", "2", "--samples", "4",
            "--forms", "wujue,qilv", "--convert", "none"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "skipped: the model does not take author=" in out or "| **mean** |" in out, out
    rows = re.findall(r"\| (wujue|qilv) \| (before|after) .*? \| (\d+\.\d)% \| (\d+) \((\d+\.\d)\) \| (\d+)% \|", out)
    assert [(f, s) for f, s, *_ in rows] == [("wujue", "before"), ("wujue", "after"), ("qilv", "before"),
                                             ("qilv", "after")], out
    assert all(float(copied) == 0 for f, s, copied, *_ in rows if s == "after"), out
    assert all(no_repeat == "100" for f, s, *_, no_repeat in rows if s == "after"), out
