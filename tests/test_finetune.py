"""`init_from`: a run starts from another model's weights and tokenizer, with its own optimizer and schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lingmao import LingmaoError
from lingmao.config import compose_config, validate
from lingmao.data import TextSource
from lingmao.data.condition import BODY_MARK, MARK_OF, conditioning
from lingmao.train import train
from tests.conftest import SAMPLE, cut_corpus, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path: Path, name: str, train_file: Path, test_file: Path, *extra: str, steps: int = 10):
    return train(compose_config([*tiny_overrides(tmp_path, train_file, test_file, steps=steps), f"run_name={name}",
                                 *extra]))


def weights(export: Path) -> dict[str, torch.Tensor]:
    return load_file(export / "model.safetensors")


def authors(export: Path) -> dict[str, int]:
    """The poets an export was conditioned on, with their poems in training."""
    return json.loads((export / "config.json").read_text(encoding="utf-8"))["condition"]["authors"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model trained for 10 steps on 200 poems: its export and its run's last checkpoint."""
    tmp = tmp_path_factory.mktemp("base")
    train_file = cut_corpus(SAMPLE / "train.jsonl", tmp / "train.jsonl", 200)
    test_file = cut_corpus(SAMPLE / "test.jsonl", tmp / "test.jsonl", 30)
    result = run(tmp, "base", train_file, test_file)
    return result, train_file, test_file


@pytest.mark.slow
def test_a_fine_tuned_run_starts_from_the_source_weights_exactly(base, tmp_path):
    result, train_file, test_file = base
    for source in (result.export_dir, result.checkpoint):
        tuned = run(tmp_path, f"step0-{source.name}", train_file, test_file, f"init_from={source}", steps=0)
        before, after = weights(result.export_dir), weights(tuned.export_dir)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
    fresh = run(tmp_path, "fresh", train_file, test_file, steps=0)  # the same seed without init_from differs
    assert not torch.equal(weights(fresh.export_dir)["head.weight"], weights(result.export_dir)["head.weight"])
    # A fresh schedule: the fine-tuned run counts its own steps, from 0.
    tuned = run(tmp_path, "five", train_file, test_file, f"init_from={result.checkpoint}", steps=5)
    assert tuned.global_step == 5


@pytest.mark.slow
def test_missing_characters_are_an_error_or_new_rows(base, tmp_path):
    result, _, test_file = base
    other = tmp_path / "other.jsonl"
    lines = (SAMPLE / "train.jsonl").read_text(encoding="utf-8").splitlines()[5000:5100]
    other.write_text("\n".join(lines) + "\n", encoding="utf-8")
    vocab = json.loads((result.export_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    new_chars = sorted({c for t in TextSource().texts(other) for c in t} - set(vocab))
    assert len(new_chars) > 20
    with pytest.raises(LingmaoError) as err:
        run(tmp_path, "refused", other, test_file, f"init_from={result.export_dir}", steps=0)
    message = str(err.value)
    assert f"lacks {len(new_chars)} of the training data's tokens" in message and "(first 20 shown)" in message
    assert "init_from_extend_vocab=true" in message and "\n" not in message
    assert len(message.split(": ", 2)[2].split(" (first")[0].split(" ")) == 20

    tuned = run(tmp_path, "extended", other, test_file, f"init_from={result.export_dir}", "init_from_extend_vocab=true",
                "data.condition=[title,author]", steps=0)
    new_vocab = json.loads((tuned.export_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    headed = TextSource(condition=conditioning(["title", "author"]))  # the titles and authors bring characters too
    header_chars = {c for t in headed.texts(other) for c in t if c not in MARK_OF.values() and c != BODY_MARK}
    added = len(header_chars - set(vocab)) + 3  # and <title> <author> <body>: the source had no header
    assert len(new_vocab) == len(vocab) + added and all(new_vocab[t] == i for t, i in vocab.items())
    assert {"<title>", "<author>", "<body>"} <= set(new_vocab)
    old, new = weights(result.export_dir), weights(tuned.export_dir)
    for key in ("embedding.weight", "head.weight"):
        assert torch.equal(new[key][: len(vocab)], old[key])
        assert torch.allclose(new[key][len(vocab):], old[key].mean(0).expand(added, -1), atol=1e-6)

    # Fine-tuned again on other poets: the export knows the source's poets as well as its own, poems counted.
    train_file = base[1]
    again = run(tmp_path, "again", train_file, test_file, f"init_from={tuned.export_dir}",
                "init_from_extend_vocab=true", "data.condition=[title,author]", steps=0)
    own = run(tmp_path, "own", train_file, test_file, "data.condition=[title,author]", steps=0)
    source, mine, both = authors(tuned.export_dir), authors(own.export_dir), authors(again.export_dir)
    assert set(source) - set(mine) and set(mine) - set(source)  # two sets of poets, each with its own
    assert both == {a: source.get(a, 0) + mine.get(a, 0) for a in {*source, *mine}}
    assert list(both.values()) == sorted(both.values(), reverse=True)  # most poems first


def test_init_from_problems_are_named_before_anything_runs(tmp_path):
    with pytest.raises(LingmaoError, match="init_from: .*nowhere: not found"):
        validate(compose_config([f"init_from={tmp_path / 'nowhere'}"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LingmaoError, match="not an exported lingmao model"):
        validate(compose_config([f"init_from={tmp_path / 'empty'}"]))


def test_one_poets_split_holds_out_texts_no_base_has_seen(tmp_path):
    from tests.test_bench_smoke import load_script

    prepare = load_script("prepare_corpus")
    lines = (SAMPLE / "train.jsonl").read_text(encoding="utf-8").splitlines()
    seen = set(json.loads(line)["text"] for line in lines[::4])  # the base model's training texts
    train, test = prepare.poet_split(lines, "杜甫", 0.2, seen)
    records = [json.loads(line) for line in train + test]
    assert {r["author"] for r in records} == {"杜甫"}
    assert len(records) == len({r["text"] for r in records}) == sum(json.loads(x)["author"] == "杜甫" for x in lines)
    assert test and not {json.loads(line)["text"] for line in test} & seen
    assert 0.1 < len(test) / len(records) < 0.3  # about a fifth, less the texts the base has seen
    again = prepare.poet_split(list(reversed(lines)), "杜甫", 0.2, seen)  # by a hash of the text, not by position
    assert sorted(again[1]) == sorted(test)
