"""Originality: the set of training lines kept in the export, the sampler's refusal to copy one, the copy figures.

Copying is judged here by plain Python sets of the training lines and substring search, not by the fingerprints
and hashes the code under test uses.
"""

from __future__ import annotations

import itertools
import json
import logging
import random

import pytest
import torch

from lingmao import LingmaoError, export_model, load_model
from lingmao.data import iter_documents
from lingmao.data.tokenizer import special_ids, train_tokenizer
from lingmao.evaluate import evaluate_verse, training_reference
from lingmao.export import LINES, LingmaoModel
from lingmao.model import ModelConfig, build_model
from lingmao.verse.forms import FormConstraint
from lingmao.verse.han import is_han
from lingmao.verse.lines import CopyFilter, LineSet, text_lines
from lingmao.verse.originality import TrainingText, copied_lines
from lingmao.verse.shape import clauses
from tests.conftest import SAMPLE

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = list(itertools.islice(iter_documents(SAMPLE / "train.jsonl"), 500))
# Six regulated 五绝 of the sample (lenient tones, one level-tone rhyme, no 重韵): a model trained on them alone
# writes them back.
POEMS = [DOCS[i] for i in (102, 112, 130, 172, 193, 434)]
TRAIN_LINES = {line for poem in POEMS for line in text_lines(poem)}


def test_lines_and_their_set(tmp_path):
    # Short clauses and damaged ones are not lines; lines are the checker's clauses (shape.clauses).
    assert text_lines("知否？知否？應是綠肥紅瘦。\n□□山下路，「白雲千載空悠悠」") == ["應是綠肥紅瘦", "白雲千載空悠悠"]
    for doc in DOCS:
        assert text_lines(doc) == [c.text for c in clauses(doc) if len(c) >= 4 and all(is_han(ch) for ch in c.text)]
    lines = LineSet.from_texts(POEMS, files=["a.jsonl"])
    assert len(lines) == len(TRAIN_LINES) == 24
    assert all(line in lines for line in TRAIN_LINES)
    assert "嫁得瞿塘賈" in lines and "嫁得瞿塘" not in lines and "嫁得瞿塘商" not in lines and "得瞿塘賈" not in lines
    assert lines.completions("嫁得瞿塘") == ["賈"] and lines.completions("嫁得瞿") == []
    assert sorted(LineSet.from_texts(["春風吹綠草，春風吹綠樹。"]).completions("春風吹綠")) == ["樹", "草"]
    lines.save(tmp_path / LINES)
    again = LineSet.load(tmp_path / LINES)
    assert again.files == ["a.jsonl"] and (again.fingerprints == lines.fingerprints).all()
    (tmp_path / "bad").write_bytes(b"not a line set")
    with pytest.raises(LingmaoError, match="bad: damaged line set"):
        LineSet.load(tmp_path / "bad")


def test_lines_are_read_without_headers_and_sets_join(tmp_path):
    from lingmao.data import TextSource
    from lingmao.data.condition import MARK_OF, conditioning

    # A conditioned run reads each poem with a header of its title and author: the header is no line of it.
    path = tmp_path / "poems.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, poem in enumerate(POEMS):
            record = {"title": "春江花月夜曲", "author": f"無名氏{i}", "text": poem}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    headed = TextSource(condition=conditioning(["title", "author"], dropout=0.0))
    assert all(doc.startswith(MARK_OF["title"] + "春江花月夜曲") for doc in headed.texts(path))
    lines = LineSet.from_files([path], headed)
    assert (lines.fingerprints == LineSet.from_texts(POEMS).fingerprints).all()
    assert "春江花月夜曲" not in lines
    # A fine-tuned model's set: its own training lines and its source's.
    first, rest = LineSet.from_texts(POEMS[:2], ["a"]), LineSet.from_texts(POEMS[2:], ["b"])
    both = first.union(rest)
    assert all(line in both for line in TRAIN_LINES) and not all(line in first for line in TRAIN_LINES)
    assert both.files == ["a", "b"] and first.union(None) is first


def test_the_filter_refuses_exactly_the_completing_character():
    """Walking a 五绝's layout with the characters of a training poem: at each line end the filter refuses the
    character that completes the training line and nothing else; elsewhere it refuses nothing."""
    tok = train_tokenizer(DOCS)
    poem = POEMS[0]  # 嫁得瞿塘賈，朝朝誤妾期。\n早知潮有信，嫁與弄潮兒。
    lines = LineSet.from_texts([poem])
    constraint = FormConstraint(tok, "wujue", rhyme="none", tones="off")
    refusal = CopyFilter(lines, tok, constraint.slots, constraint.start, "")
    ids = torch.tensor([tok.token_to_id(ch) for ch in poem])
    generated = ids.unsqueeze(0).repeat(2, 1)
    generated[1, 0] = tok.token_to_id("春")  # the second sample's first line differs: no refusal there
    for step in range(len(poem)):
        allowed = refusal.allowed(step, generated[:, :step])
        if poem[step] in "賈期信兒" and (step + 1 == len(poem) or poem[step + 1] in "，。"):
            assert allowed is not None and allowed.shape == (2, tok.get_vocab_size())
            assert (~allowed[0]).nonzero().flatten().tolist() == [tok.token_to_id(poem[step])]
            assert bool(allowed[1].all()) == (step == 4)
        else:
            assert allowed is None, step
    # A prompt that fills the line up to its last character counts too.
    prompted = CopyFilter(lines, tok, constraint.slots, 4, "嫁得瞿塘")
    assert (~prompted.allowed(0, torch.zeros(1, 0, dtype=torch.long))[0]).sum() == 1


def overfit_model() -> LingmaoModel:
    """A tiny model trained on the six poems alone, until it writes them back."""
    tok = train_tokenizer(DOCS)
    ids = special_ids(tok)
    stream = torch.tensor([i for t in POEMS for i in [ids["bos"], *tok.encode(t, add_special_tokens=False).ids,
                                                       ids["eos"]]])
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=64, nhead=2, num_layers=2, dim_feedforward=128), tok.get_vocab_size())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(120):
        starts = torch.randint(0, len(stream) - 33, (16,))
        x = torch.stack([stream[s : s + 32] for s in starts])
        y = torch.stack([stream[s + 1 : s + 33] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, model.vocab_size), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return LingmaoModel(model.eval(), tok, {"data": {"context_length": 32}})


def share_copied(poems: list[str]) -> float:
    found = [line for poem in poems for line in text_lines(poem)]
    return sum(line in TRAIN_LINES for line in found) / len(found)


@pytest.mark.slow
def test_a_model_that_copies_is_refused_its_copies(tmp_path, caplog):
    lm = overfit_model()
    options = dict(form="wujue", num_samples=40, seed=0, temperature=1.0, top_p=1.0)
    copying = lm.generate(**options)  # no line set: nothing is refused
    assert share_copied(copying) > 0.6, copying[:3]

    export_model(tmp_path / "new", lm.model, lm.tokenizer, lm.model.config, {"context_length": 32},
                 lines=LineSet.from_texts(POEMS))
    new = load_model(tmp_path / "new")
    assert len(new.lines) == len(TRAIN_LINES)
    original = new.generate(**options)  # refuse_copies is on by default with a form
    assert share_copied(original) == 0, [p for p in original if share_copied([p])]
    assert new.generate(**options, refuse_copies=False) == copying  # off: the same poems as without a line set
    assert new.generate(tune="生查子", num_samples=2, seed=0, refuse_copies=True)  # ci tunes too
    # The copy figures of the evaluation agree with the plain sets; the training text is read from the file.
    assert copied_lines(copying, new.lines) == (sum(line in TRAIN_LINES for p in copying for line in text_lines(p)),
                                                4 * len(copying))
    assert copied_lines(original, new.lines)[0] == 0
    train_file = tmp_path / "poems.jsonl"
    train_file.write_text("".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in POEMS), "utf-8")
    lines, text = training_reference(new, str(train_file))
    figures = {refuse: evaluate_verse(new, ["wujue"], 40, train_lines=lines, train_text=text, seed=0,
                                      temperature=1.0, top_p=1.0, refuse_copies=refuse)["wujue"]
               for refuse in (False, None)}
    assert figures[False]["copied lines"] > 0.6 and figures[False]["longest copied run"] == len(POEMS[0])  # whole poems
    assert figures[None]["copied lines"] == 0
    assert figures[None]["longest copied run"] <= 10  # 4 characters of a line, its end, 4 of the next at most

    # An export written before there were line sets loads, says so once, and copies.
    export_model(tmp_path / "old", lm.model, lm.tokenizer, lm.model.config, {"context_length": 32})
    with caplog.at_level(logging.WARNING, logger="lingmao.export"):
        old = load_model(tmp_path / "old")
        assert old.lines is None and old.generate(**options) == copying and old.generate(**options) == copying
    assert [r.getMessage() for r in caplog.records].count(
        f"{tmp_path / 'old'}: no set of training lines ({LINES}; an export written before lingmao kept one): "
        "generated verse may copy training lines") == 1
    with pytest.raises(LingmaoError, match="refuse_copies=true: this model has no set of training lines"):
        old.generate(**options, refuse_copies=True)


def test_an_export_without_lines_replaces_one_with_lines(tmp_path, caplog):
    tok = train_tokenizer(POEMS)
    model = build_model(ModelConfig(d_model=16, nhead=2, num_layers=1, dim_feedforward=32), tok.get_vocab_size())
    export_model(tmp_path / "m", model, tok, model.config, {"context_length": 16}, lines=LineSet.from_texts(POEMS))
    assert (tmp_path / "m" / LINES).is_file() and load_model(tmp_path / "m").lines is not None
    export_model(tmp_path / "m", model, tok, model.config, {"context_length": 16})
    assert not (tmp_path / "m" / LINES).exists()
    with caplog.at_level(logging.WARNING, logger="lingmao.export"):
        lm = load_model(tmp_path / "m")
    assert lm.lines is None and "no set of training lines" in caplog.text
    assert lm.generate(form="wujue", tones="off", rhyme="none", seed=0)  # the refusal is off, generation works
    with pytest.raises(LingmaoError, match="refuse_copies=true: needs a verse form"):
        LingmaoModel(model, tok, {}, LineSet.from_texts(POEMS)).generate("春", max_new_tokens=2, refuse_copies=True)


def test_longest_copied_run_against_brute_force():
    texts = DOCS[:60]
    reference = TrainingText(texts)
    rng = random.Random(0)
    poems = ["", "床", "□□□"]
    for _ in range(40):  # pieces of training documents stitched together, with noise
        parts = []
        for _ in range(rng.randint(1, 3)):
            doc = rng.choice(texts)
            a = rng.randrange(len(doc))
            parts.append(doc[a : a + rng.randint(1, 20)])
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(["", "龘", "。\n"]))
        poems.append("".join(parts))

    def brute(poem: str) -> int:
        return max((j - i for i in range(len(poem)) for j in range(i + 1, len(poem) + 1)
                    if any(poem[i:j] in t for t in texts)), default=0)

    assert reference.longest_runs(poems) == [brute(p) for p in poems]
    # A run never joins two documents: the end of one and the start of the next are two runs.
    assert TrainingText(["白日依山尽", "黄河入海流"]).longest_runs(["山尽黄河"]) == [2]
