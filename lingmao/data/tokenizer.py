"""Character-level tokenizer: a HF `tokenizers` tokenizer.json, and a vectorised encoder that matches it.

Classical Chinese has no spaces and most characters are words or morphemes, so each character is one
token; punctuation, spaces and newlines are kept as tokens of their own. Every document is wrapped as
`<bos> text <eos>`; characters never seen in training map to `<unk>`. The tokenizer.json is the definition.

A model trained with `data.condition` also has the header tokens `<title> <author> <keywords> <body>`
(`lingmao.data.condition`). They are entries of the vocabulary but not added tokens of the tokenizer.json, whose
pre-tokenizer splits every text into single characters: no text can ever encode to one of them. Only the header
that `lingmao.data.condition` writes (as markers, below) becomes these tokens.

Encoding it one regex match at a time runs at a few MB/s, so texts are encoded in two vectorised steps:

1. `text_symbols`: the texts become *symbols*: their code points (numpy, from UTF-32), with the start and end
   of every document and each special-token string found in a text (`<eos>` typed in a poem is the `<eos>`
   token, as in the tokenizer.json) as markers. The markers are the noncharacters U+FDD0..U+FDD7 (the four
   special tokens, then the four header tokens), which Unicode keeps for a program's internal use; a text
   holding one of them (legal, and rare) has it moved to a symbol above the Unicode range. In a document
   with a header (`headed=True`), the header markers up to the first `<body>` marker are the header's. Symbols
   do not depend on the vocabulary, which is why the token caches keep them (`lingmao.data.cache`).
2. `FastEncoder.table`: symbol -> token id, one lookup table made from the tokenizer's vocabulary.

`FastEncoder.for_tokenizer` accepts only tokenizers whose encoding this reproduces exactly (checked on the
tokenizer.json: character split, no normalizer, the four special tokens, `<bos> $A <eos>`); anything else is
encoded by `Tokenizer.encode_batch`. Tests compare the two on the bundled corpus and on edge cases.

`train_tokenizer_from_counts` builds the same tokenizer.json as `train_tokenizer` (HF's WordLevelTrainer:
characters by count, then by code point) from symbol counts the caches already hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lingmao.errors import LingmaoError
from lingmao.io import atomic_write_bytes

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]
TITLE, AUTHOR, KEYWORDS, BODY = "<title>", "<author>", "<keywords>", "<body>"
HEADER_TOKENS = [TITLE, AUTHOR, KEYWORDS, BODY]  # the conditioning header (lingmao.data.condition)
RESERVED = SPECIAL_TOKENS + HEADER_TOKENS
SPLIT_PATTERN = r"[\s\S]"  # one token per character, newlines included

CODE_POINTS = 0x110000
MARKERS = 0xFDD0  # the symbol of RESERVED[k] is MARKERS + k (a noncharacter)
ESCAPED = CODE_POINTS  # the character MARKERS + k, when a text holds it, is the symbol ESCAPED + k
NUM_SYMBOLS = ESCAPED + len(RESERVED)
DOC_START = MARKERS + SPECIAL_TOKENS.index(BOS)
DOC_END = MARKERS + SPECIAL_TOKENS.index(EOS)
BODY_MARKER = MARKERS + RESERVED.index(BODY)
_START, _END = chr(DOC_START), chr(DOC_END)


def marker(token: str) -> str:
    """The character that stands for a reserved token in a text with a header (`text_symbols(headed=True)`)."""
    return chr(MARKERS + RESERVED.index(token))


# ----------------------------------------------------------------------------------------------
# The tokenizer.json
# ----------------------------------------------------------------------------------------------
def _char_tokenizer(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def _add_document_template(tok: Tokenizer) -> Tokenizer:
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)]
    )
    return tok


def train_tokenizer(texts: Iterable[str], min_frequency: int = 1) -> Tokenizer:
    """Build a character vocabulary from `texts` with HF's trainer (an iterator is fine: it is read once)."""
    tok = _char_tokenizer(models.WordLevel(unk_token=UNK))
    trainer = trainers.WordLevelTrainer(
        vocab_size=10_000_000, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _add_document_template(tok)


def train_tokenizer_from_counts(counts: np.ndarray, documents: int, min_frequency: int = 1) -> Tokenizer:
    """The tokenizer `train_tokenizer` would build from texts whose symbols (`text_symbols`) have these counts.

    `counts` has one entry per symbol (NUM_SYMBOLS); `documents` is how many documents they came from (each
    adds one start and one end marker). HF's trainer sees special-token strings in a text as characters, so
    their markers count for the characters they are made of. The header tokens the documents use (texts
    with a conditioning header) follow the special tokens; without headers the vocabulary is `train_tokenizer`'s.
    """
    counts = np.pad(np.asarray(counts, dtype=np.int64), (0, max(0, NUM_SYMBOLS - len(counts))))
    chars = counts[:CODE_POINTS].copy()
    for k, token in enumerate(RESERVED):
        chars[MARKERS + k] = counts[ESCAPED + k]
        if token in SPECIAL_TOKENS:
            in_text = int(counts[MARKERS + k]) - (documents if token in (BOS, EOS) else 0)
            for ch in token:
                chars[ord(ch)] += in_text
    kept = np.flatnonzero(chars >= max(min_frequency, 1))
    kept = kept[np.lexsort((kept, -chars[kept]))]  # by count, most frequent first; ties by code point
    headers = [t for k, t in enumerate(HEADER_TOKENS, len(SPECIAL_TOKENS)) if counts[MARKERS + k] > 0]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + headers)}
    first = len(vocab)
    vocab.update((chr(c), first + i) for i, c in enumerate(kept.tolist()))
    tok = _char_tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.add_special_tokens(SPECIAL_TOKENS)
    return _add_document_template(tok)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json written by `train_tokenizer`; a bad file is a one-line error."""
    path = Path(path)
    try:
        tok = Tokenizer.from_file(str(path))
    except FileNotFoundError:
        raise LingmaoError(f"{path}: tokenizer file not found") from None
    except Exception as exc:  # tokenizers raises plain Exception for malformed JSON
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LingmaoError(
            f"{path}: not a valid tokenizer.json ({first}); delete it to have a new one trained"
        ) from None
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise LingmaoError(f"{path}: tokenizer lacks the special tokens {missing}; delete it to have a new one trained")
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """{'pad': id, 'unk': id, 'bos': id, 'eos': id}."""
    return {name.strip("<>"): tok.token_to_id(name) for name in SPECIAL_TOKENS}


def header_ids(tok: Tokenizer) -> dict[str, int]:
    """{'title': id, 'author': id, 'keywords': id, 'body': id}: the header tokens the vocabulary has."""
    found = {name.strip("<>"): tok.token_to_id(name) for name in HEADER_TOKENS}
    return {name: i for name, i in found.items() if i is not None}


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write atomically (temporary file + rename), so a half-written tokenizer.json is never read."""
    atomic_write_bytes(Path(path), tok.to_str(pretty=False).encode("utf-8"))


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """A short hash of the vocabulary and settings: part of every token cache key."""
    data = json.loads(tok.to_str())
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Texts -> symbols -> ids
# ----------------------------------------------------------------------------------------------
_SPECIAL_CODES = [np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32) for t in SPECIAL_TOKENS]


def text_symbols(texts: Sequence[str], headed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(symbols, lengths): the symbols of `<bos> text <eos>` for every text, joined (uint32), and how many
    belong to each text. One symbol per character except special-token strings, one symbol each.

    `headed`: each text starts with a conditioning header (`lingmao.data.condition`): its marker characters,
    up to and including the first `<body>` marker, are the header tokens, and its field values are taken as
    they are (no special-token strings); the rest of the text is read like any other."""
    joined = _START + (_END + _START).join(texts) + _END
    try:
        symbols = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
    except UnicodeEncodeError:
        raise ValueError("a text holds a surrogate code point (\\ud800-\\udfff), which is not a character") from None
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)) + 2
    header = _header_positions(symbols, lengths) if headed else None
    reserved = np.count_nonzero(symbols - np.uint32(MARKERS) < len(RESERVED))
    if reserved != 2 * len(texts) + (np.count_nonzero(_reserved(symbols[header])) if header is not None else 0):
        symbols = _escape_marker_characters(symbols, lengths, header)
    if "<" in joined:
        symbols, lengths = _mark_special_strings(symbols, lengths, header)
    return symbols, lengths


def _reserved(codes: np.ndarray) -> np.ndarray:
    return codes - np.uint32(MARKERS) < len(RESERVED)


def _bounds(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ends = np.cumsum(lengths) - 1
    return ends - lengths + 1, ends


def _header_positions(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """bool per symbol: inside a document's header (after its start marker, up to its first `<body>` marker)."""
    starts, _ = _bounds(lengths)
    body = np.flatnonzero(codes == BODY_MARKER)
    doc = np.searchsorted(starts, body, side="right") - 1
    docs, first = np.unique(doc, return_index=True)
    delta = np.zeros(len(codes) + 1, dtype=np.int64)
    np.add.at(delta, starts[docs] + 1, 1)
    np.add.at(delta, body[first] + 1, -1)
    return np.cumsum(delta[:-1]) > 0


def _escape_marker_characters(codes: np.ndarray, lengths: np.ndarray, header: np.ndarray | None = None) -> np.ndarray:
    """Characters U+FDD0..U+FDD7 inside the texts (not a header's) become ESCAPED + k: only markers are markers."""
    starts, ends = _bounds(lengths)
    inside = _reserved(codes)
    inside[starts] = False
    inside[ends] = False
    if header is not None:
        inside &= ~header
    symbols = codes.copy()
    symbols[inside] += ESCAPED - MARKERS
    return symbols


def _mark_special_strings(codes: np.ndarray, lengths: np.ndarray,
                          header: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each `<pad>` `<unk>` `<bos>` `<eos>` in a text (not in a header) becomes its marker. They begin with '<' and
    hold no other '<' or '>', so occurrences never overlap and none spans two texts (joined with markers)."""
    at = np.flatnonzero(codes == ord("<"))
    if header is not None:
        at = at[~header[at]]
    starts, _ = _bounds(lengths)
    symbols = codes.copy()
    keep = np.ones(len(codes), dtype=bool)
    lengths = lengths.copy()
    for k, special in enumerate(_SPECIAL_CODES):
        span = len(special)
        cand = at[at + span <= len(codes)]
        found = cand[(codes[cand[:, None] + np.arange(span)] == special).all(axis=1)]
        if len(found) == 0:
            continue
        symbols[found] = MARKERS + k
        keep[(found[:, None] + np.arange(1, span)).ravel()] = False
        doc = np.searchsorted(starts, found, side="right") - 1
        lengths -= np.bincount(doc, minlength=len(lengths)) * (span - 1)
    return symbols[keep], lengths


class FastEncoder:
    """Token ids of symbols by table lookup, identical to the tokenizer.json's own encoding."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table  # symbol -> token id, NUM_SYMBOLS entries

    @classmethod
    def for_tokenizer(cls, tok: Tokenizer) -> FastEncoder | None:
        """The encoder of `tok`, or None when `tok` is not a character tokenizer of this kind."""
        spec = json.loads(tok.to_str())
        problem = _unsupported(spec)
        if problem:
            log.info("tokenizer: %s; encoding with the tokenizers library", problem)
            return None
        vocab: dict[str, int] = spec["model"]["vocab"]
        unk = vocab[spec["model"]["unk_token"]]
        dtype = np.uint16 if max(vocab.values()) < 1 << 16 else np.uint32
        table = np.full(NUM_SYMBOLS, unk, dtype=dtype)
        chars = [(ord(t), i) for t, i in vocab.items() if len(t) == 1]
        if chars:
            codes, ids = np.array(chars, dtype=np.int64).T
            table[codes] = ids
        for k, token in enumerate(RESERVED):
            table[ESCAPED + k] = table[MARKERS + k]  # the character, should a text hold it
            i = tok.token_to_id(token)  # None: a header token of a vocabulary without conditioning
            table[MARKERS + k] = unk if i is None else i
        return cls(table)

    def encode_batch(self, texts: Sequence[str], headed: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids, lengths): the ids of every text joined, and how many belong to each; the same as
        `[tok.encode(t).ids for t in texts]` flattened (`headed`: texts with a header, see `text_symbols`)."""
        symbols, lengths = text_symbols(texts, headed)
        return self.table[symbols], lengths


def _unsupported(spec: dict) -> str | None:
    """Why `FastEncoder` cannot reproduce the tokenizer described by `spec` (its tokenizer.json), or None."""
    model = spec.get("model") or {}
    if model.get("type") != "WordLevel" or model.get("unk_token") not in (model.get("vocab") or {}):
        return "not a word-level model with an unknown token"
    if spec.get("normalizer") is not None or spec.get("truncation") is not None or spec.get("padding") is not None:
        return "a normalizer, truncation or padding"
    expected_split = {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": False}
    if spec.get("pre_tokenizer") != expected_split:
        return "not split into single characters"
    vocab = model["vocab"]
    added = spec.get("added_tokens") or []
    if sorted(t["content"] for t in added) != sorted(SPECIAL_TOKENS) or any(
        not t["special"] or t["normalized"] or t["lstrip"] or t["rstrip"] or t["single_word"]
        or vocab.get(t["content"]) != t["id"] for t in added
    ):
        return "other added tokens than <pad> <unk> <bos> <eos>"
    post = spec.get("post_processor") or {}
    single = [next(iter(piece.values()))["id"] for piece in post.get("single", [])]
    ids = {name: value.get("ids") for name, value in (post.get("special_tokens") or {}).items()}
    if post.get("type") != "TemplateProcessing" or single != [BOS, "A", EOS] or \
            ids.get(BOS) != [vocab[BOS]] or ids.get(EOS) != [vocab[EOS]]:
        return "documents are not wrapped as <bos> text <eos>"
    return None
