"""Evaluation: loss, perplexity and bits per character against a hand-computed forward pass; the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lingmao import LingmaoError, load_model
from lingmao.evaluate import evaluate_file
from tests.conftest import run_module

POEMS = [
    "秦川雄帝宅，函谷壯皇居。\n綺殿千尋起，離宮百雉餘。",
    "執契靜三邊，持衡臨萬姓。",
    "春風吹綠草，明月照高樓。\n山水無窮意，江天一色秋。",
]


@pytest.fixture()
def test_file(tmp_path) -> Path:
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in POEMS), encoding="utf-8")
    return path


def by_hand(lm, texts: list[str], ctx: int) -> tuple[float, int]:
    """Total nats and predicted tokens: <bos> doc <eos> packed, windows of ctx, the last one shorter."""
    flat = [i for t in texts for i in lm.tokenizer.encode(t).ids]
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(flat) - 1, ctx):
            x = torch.tensor(flat[s : s + ctx][: len(flat) - 1 - s]).unsqueeze(0)
            y = torch.tensor(flat[s + 1 : s + 1 + x.size(1)])
            total += float(F.cross_entropy(lm.model(x)[0], y, reduction="sum"))
            count += len(y)
    return total, count


@pytest.mark.parametrize("ctx", [16, 128])  # several windows and a shorter last one; a single window
def test_metrics_match_a_hand_computed_forward_pass(model_dir, test_file, ctx):
    lm = load_model(model_dir)
    result = evaluate_file(lm, test_file, context_length=ctx, batch_size=2, progress=False)
    total, count = by_hand(lm, POEMS, ctx)
    assert result["predicted_tokens"] == count == sum(len(t) + 2 for t in POEMS) - 1
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    characters = sum(len(t) for t in POEMS)
    assert result["characters"] == characters
    assert result["bits_per_character"] == pytest.approx(total / math.log(2) / characters, rel=1e-5)
    assert result["windows"] == math.ceil(count / ctx)


def test_a_model_that_knows_nothing_scores_log2_of_the_vocabulary(model_dir, test_file):
    """Independent of the code's formula: a model whose logits are all equal spends exactly log2(V) bits on every
    token, so its bits per character are log2(V) x tokens predicted / characters of the text."""
    lm = load_model(model_dir)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.zero_()
    result = evaluate_file(lm, test_file, context_length=16, batch_size=2, progress=False)
    vocab = lm.tokenizer.get_vocab_size()
    predicted = sum(len(t) + 2 for t in POEMS) - 1  # <bos> text <eos> per poem, all but the first token
    characters = sum(len(t) for t in POEMS)
    assert result["bits_per_character"] == pytest.approx(math.log2(vocab) * predicted / characters, rel=1e-5)
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-5)


def test_context_length_from_the_export(model_dir, test_file):
    lm = load_model(model_dir)
    assert evaluate_file(lm, test_file, progress=False)["context_length"] == 64
    with pytest.raises(LingmaoError, match="not found"):
        evaluate_file(lm, test_file.with_name("missing.jsonl"), progress=False)
    with pytest.raises(LingmaoError, match="longer than the model"):
        evaluate_file(lm, test_file, context_length=1000, progress=False)


@pytest.mark.slow
def test_cli(model_dir, test_file, tmp_path):
    out = tmp_path / "result.json"
    proc = run_module("lingmao.evaluate", f"model_dir={model_dir}", f"data.test_file={test_file}", f"output={out}",
                      cwd=tmp_path, timeout=120, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    assert "perplexity" in proc.stdout and str(out) in proc.stdout
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["predicted_tokens"] == sum(len(t) + 2 for t in POEMS) - 1
