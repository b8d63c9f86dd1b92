"""The vectorised encoder and the trainer from counts give exactly what the tokenizers library gives."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from lingmao.data import (
    FastEncoder,
    TextSource,
    iter_documents,
    load_or_tokenize,
    text_symbols,
    train_tokenizer,
    train_tokenizer_from_counts,
)
from lingmao.data.tokenizer import NUM_SYMBOLS, SPECIAL_TOKENS
from tests.conftest import SAMPLE

EDGE_CASES = [
    "",  # an empty document: <bos> <eos>
    "床前明月光\r\n疑是地上霜",  # Windows line ending (the reader turns it into \n; the encoder sees it as it is)
    "\ufeff床前",  # a byte-order mark inside a text is a character
    "𠀀𠀁\U0001f600",  # astral-plane characters: one token each
    "鑫\u0007☃",  # characters no training text had: <unk>
    "<bos><eos><pad><unk>",  # special-token strings in a text are the special tokens (as tokenizer.json does)
    "a<eos>b<<bos>>c<BOS><bo s><eos",  # and only exact ones
    "\ufdd0\ufdd1\ufdd2\ufdd3",  # the noncharacters the encoder uses as markers, as characters of a text
    "\ufdd2<eos>\ufdd3",
    "\ufdd4\ufdd5\ufdd6\ufdd7<title><author><keywords><body>",  # the header's markers and tokens, as text
    " \t\n\n　",  # whitespace of all kinds
    "x" * 5000,  # a long document
]


@pytest.fixture(scope="module")
def sample_texts() -> list[str]:
    return list(iter_documents(SAMPLE / "train.jsonl")) + list(iter_documents(SAMPLE / "test.jsonl"))


@pytest.fixture(scope="module")
def tokenizer(sample_texts) -> Tokenizer:
    """Trained by the tokenizers library on the bundled training texts and a few of the edge cases."""
    return train_tokenizer(list(iter_documents(SAMPLE / "train.jsonl")) + EDGE_CASES[3:4] + EDGE_CASES[7:8])


def hf_ids(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts)]


def split(ids: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    ends = np.cumsum(lengths)
    return [ids[e - n : e].tolist() for e, n in zip(ends, lengths, strict=True)]


def test_fast_encoder_matches_the_tokenizer_on_the_whole_bundled_corpus(tokenizer, sample_texts):
    encoder = FastEncoder.for_tokenizer(tokenizer)
    assert encoder is not None
    ids, lengths = encoder.encode_batch(sample_texts)
    expected = hf_ids(tokenizer, sample_texts)
    assert split(ids, lengths) == expected
    assert sum(len(e) for e in expected) > 500_000  # the whole corpus, train and test (with unknown characters)


@pytest.mark.parametrize("text", EDGE_CASES)
def test_fast_encoder_matches_the_tokenizer_on_edge_cases(tokenizer, text):
    ids, lengths = FastEncoder.for_tokenizer(tokenizer).encode_batch([text, "床" + text, text + "光"])
    assert split(ids, lengths) == hf_ids(tokenizer, [text, "床" + text, text + "光"])


def test_special_strings_become_special_tokens_and_unknowns_unk(tokenizer):
    """Spelled out, not only compared: `<eos>` typed in a text is one <eos> token, an unseen character <unk>."""
    ids, _ = FastEncoder.for_tokenizer(tokenizer).encode_batch(["月<eos>鑫"])
    bos, eos, unk = (tokenizer.token_to_id(t) for t in ("<bos>", "<eos>", "<unk>"))
    assert ids.tolist() == [bos, tokenizer.token_to_id("月"), eos, unk, eos]


def test_trainer_from_counts_writes_the_same_tokenizer_json(sample_texts):
    texts = sample_texts + EDGE_CASES
    symbols, _ = text_symbols(texts)
    counts = np.bincount(symbols, minlength=NUM_SYMBOLS)
    for min_frequency in (1, 3):
        ours = train_tokenizer_from_counts(counts, len(texts), min_frequency)
        assert ours.to_str() == train_tokenizer(texts, min_frequency).to_str()


def test_a_tokenizer_of_another_kind_is_encoded_by_the_library(tmp_path):
    """A word-level tokenizer split on whitespace is not a character tokenizer: the data path falls back to
    `encode_batch`, caches its ids, and still gives the library's ids."""
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, "床前", "明月光"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 2),
                                                                                             ("<eos>", 3)])
    assert FastEncoder.for_tokenizer(tok) is None
    f = tmp_path / "w.jsonl"
    f.write_text('{"text": "床前 明月光"}\n{"text": "明月光 床前 疑是"}\n', encoding="utf-8")
    data = load_or_tokenize(f, tok, TextSource(), tmp_path / "cache")
    assert data.ids().tolist() == [2, 4, 5, 3, 2, 5, 4, 1, 3]
    assert data.doc_offsets.tolist() == [0, 4, 9]


def test_a_text_with_a_surrogate_is_refused():
    with pytest.raises(ValueError, match="surrogate"):
        text_symbols(["a\ud800b"])
