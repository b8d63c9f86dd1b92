"""Conditioning headers: a poem's title, author and keywords written before its text, in reserved tokens.

With `data.condition=[title,author,keywords]` every document is tokenized as

    <bos> <title> 静夜思 <author> 李白 <keywords> 月霜 <body> 床前明月光，疑是地上霜。... <eos>

so the model learns p(text | header), and generation (`title=`, `author=`, `keywords=`) starts from a header.
`<title> <author> <keywords> <body>` are reserved tokens of the vocabulary that no text encodes to
(`lingmao.data.tokenizer`); in the texts that carry a header they are written as the noncharacters U+FDD4..U+FDD7,
and characters U+FDD0..U+FDEF are removed from the field values, so the first `<body>` marker ends the header.

- title, author: the JSONL line's `title` and `author` fields (a .txt document has none). A field that is
  absent, empty or not a string is left out of the header.
- keywords: taken from the text when it is tokenized: its most distinctive Han characters by TF-IDF over the
  training documents, score(c) = tf(c) x ln(N / df(c)), where tf(c) is how often c occurs in the text, N the
  number of training documents and df(c) the number of them that hold c (a character no training document holds
  is never a keyword). A text gets n = 1 + h mod K keywords (h a hash of its text, K = `data.condition_keywords`),
  so the texts carry 1 to K keywords and a user may give any number up to K. They are written in the order of
  their first occurrence in the text, one character each, without separators.
- dropout: each field of a text is left out with probability `data.condition_dropout`, chosen by a hash of
  the text and the field's name (the same in every run), so the model also learns each field's absence and
  p(text) with an empty header (`<bos> <body> text <eos>`).

The header is built in two steps: reading writes the title and author with their markers (`raw_header`), before
`data.convert`; after conversion `Conditioning.finish` applies the dropout and adds the keywords, both decided on
the converted text.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lingmao.data.tokenizer import AUTHOR, BODY, KEYWORDS, MARKERS, RESERVED, TITLE, marker
from lingmao.errors import LingmaoError
from lingmao.verse.han import is_han

FIELDS = ("title", "author", "keywords")
RECORD_FIELDS = ("title", "author")  # read from the JSONL line; keywords come from the text
TOKEN_OF = {"title": TITLE, "author": AUTHOR, "keywords": KEYWORDS}
MARK_OF = {name: marker(token) for name, token in TOKEN_OF.items()}
BODY_MARK = marker(BODY)
_FIELD_OF_MARK = {mark: name for name, mark in MARK_OF.items()}
_NONCHARACTERS = re.compile("[\ufdd0-\ufdef]")
_SPLIT = re.compile("([" + "".join(MARK_OF.values()) + "])")


def clean_value(value: Any) -> str:
    """A field value as the header holds it: a string without noncharacters (anything else: empty)."""
    return _NONCHARACTERS.sub("", value).strip() if isinstance(value, str) else ""


def field_problems(fields: Sequence[str]) -> list[str]:
    """What is wrong with a `data.condition` list (unknown or repeated names)."""
    out = []
    for name in fields:
        if name not in FIELDS:
            out.append(f"data.condition: '{name}' is not one of {', '.join(FIELDS)}")
    if len(set(fields)) != len(fields):
        out.append(f"data.condition: {list(fields)} names a field twice")
    return out


def _hash(text: str, salt: str) -> int:
    return zlib.crc32(text.encode("utf-8"), zlib.crc32(salt.encode("utf-8")))


@dataclass
class Conditioning:
    """Which fields a header carries and how they are made (see the module docstring)."""

    fields: tuple[str, ...]
    keywords: int = 3  # at most this many keywords a text (data.condition_keywords)
    dropout: float = 0.1  # each field left out with this probability (data.condition_dropout)
    frequencies: dict[str, int] | None = None  # training documents holding each character (for keywords)
    documents: int = 0  # training documents counted in `frequencies`
    _idf: dict[str, float] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.fields = tuple(f for f in FIELDS if f in self.fields)  # the header's order, whatever the list's

    @property
    def needs_frequencies(self) -> bool:
        return "keywords" in self.fields and self.frequencies is None

    @property
    def record_fields(self) -> tuple[str, ...]:
        return tuple(f for f in RECORD_FIELDS if f in self.fields)

    def with_frequencies(self, frequencies: dict[str, int], documents: int) -> Conditioning:
        return Conditioning(self.fields, self.keywords, self.dropout, dict(frequencies), int(documents))

    # -- building a document's header -------------------------------------------------------------
    def raw_header(self, record: Mapping[str, Any]) -> str:
        """The title and author of a JSONL line with their markers, then `<body>`: what reading puts first."""
        parts = []
        for name in self.record_fields:
            value = clean_value(record.get(name))
            if value:
                parts.append(MARK_OF[name] + value)
        return "".join(parts) + BODY_MARK

    def finish(self, document: str) -> str:
        """A converted document from `raw_header` + text, with the dropout applied and the keywords added."""
        values, body = split_document(document)
        if "keywords" in self.fields:
            values["keywords"] = self.keywords_of(body)
        parts = [MARK_OF[name] + values[name] for name in self.fields
                 if values.get(name) and not self._dropped(name, body)]
        return "".join(parts) + BODY_MARK + body

    def _dropped(self, name: str, body: str) -> bool:
        return self.dropout > 0 and _hash(body, name) / 2**32 < self.dropout

    def keywords_of(self, body: str) -> str:
        """The text's keywords (see the module docstring): its top TF-IDF Han characters, in text order."""
        if self.frequencies is None:
            raise ValueError("keywords need the document frequencies of the training set (with_frequencies)")
        if self._idf is None:
            n = max(self.documents, 1)
            self._idf = {c: math.log(n / df) for c, df in self.frequencies.items() if df > 0}
        idf = self._idf
        tf = Counter(c for c in body if c in idf)
        if not tf:
            return ""
        first = {}
        for i, c in enumerate(body):
            first.setdefault(c, i)
        wanted = 1 + _hash(body, "keywords") % self.keywords
        best = sorted(tf, key=lambda c: (-tf[c] * idf[c], first[c]))[:wanted]
        return "".join(sorted(best, key=first.__getitem__))

    def header(self, title: str | None = None, author: str | None = None, keywords: str | None = None) -> str:
        """The header of a generation (markers and values, ending with `<body>`): the given fields the model
        was trained with, in the header's order."""
        given = {"title": title, "author": author, "keywords": keywords}
        return "".join(MARK_OF[n] + clean_value(given[n]) for n in self.fields if clean_value(given[n])) + BODY_MARK

    # -- identity ------------------------------------------------------------------------------------
    def key(self) -> str:
        """What the documents depend on (part of every token cache key and of the tokenizer's)."""
        freq = None
        if self.frequencies is not None:
            data = json.dumps(sorted(self.frequencies.items()), ensure_ascii=False).encode("utf-8")
            freq = f"{self.documents}:{hashlib.sha256(data).hexdigest()[:16]}"
        return json.dumps(["condition", list(self.fields), self.keywords, self.dropout, freq])

    def record(self) -> dict[str, Any]:
        """What an export keeps of it (the authors are added by the data module)."""
        out: dict[str, Any] = {"fields": list(self.fields), "keywords": self.keywords, "dropout": self.dropout}
        if self.frequencies is not None:
            out.update(documents=self.documents, frequencies=self.frequencies)
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Conditioning:
        return cls(tuple(record.get("fields") or ()), int(record.get("keywords", 3)),
                   float(record.get("dropout", 0.0)), record.get("frequencies"), int(record.get("documents", 0)))


def conditioning(fields: Iterable[str] | None, keywords: int = 3, dropout: float = 0.1) -> Conditioning | None:
    """The Conditioning of the `data.condition*` keys (None: no header)."""
    fields = tuple(fields or ())
    problems = field_problems(fields)
    if problems:
        raise LingmaoError(problems[0])
    return Conditioning(fields, keywords, dropout) if fields else None


def model_conditioning(config: Mapping[str, Any], tok: Any) -> Conditioning | None:
    """The conditioning a model was trained with: its export's record, else what its vocabulary's header tokens
    say (a checkpoint without an export), else None."""
    record = config.get("condition")
    if record:
        return Conditioning.from_record(record)
    if tok.token_to_id(BODY) is None:
        return None
    return Conditioning(tuple(name for name, token in TOKEN_OF.items() if tok.token_to_id(token) is not None))


def ranked_authors(poems: Mapping[str, int]) -> dict[str, int]:
    """Authors with their poems in training, most poems first (then by name): the order exports keep them in."""
    return dict(sorted(poems.items(), key=lambda kv: (-kv[1], kv[0])))


def check_author(author: str, authors: Mapping[str, int]) -> None:
    """A LingmaoError naming the closest of the model's authors when `author` is not one of them."""
    if author in authors:
        return
    names = list(authors)  # most poems first
    close = [n for n in names if author in n or n in author][:5]
    close += [n for n in difflib.get_close_matches(author, names, n=5, cutoff=0.4) if n not in close]
    hint = f"; close: {', '.join(close[:5])}" if close else ""
    raise LingmaoError(f"author: '{author}' is not one of the model's {len(names)} authors{hint} "
                       "(list them with list_authors=true)")


def parse_header(head: str) -> dict[str, str]:
    """{field: value} of the part of a document before its `<body>` marker."""
    values: dict[str, str] = {}
    name = None
    for piece in _SPLIT.split(head):
        if piece in _FIELD_OF_MARK:
            name = _FIELD_OF_MARK[piece]
        elif name is not None and piece:
            values[name] = piece
    return values


def split_document(document: str) -> tuple[dict[str, str], str]:
    """(header fields, text) of a document with a header."""
    head, _, body = document.partition(BODY_MARK)
    return parse_header(head), body


# ----------------------------------------------------------------------------------------------
# Statistics over token caches of characters
# ----------------------------------------------------------------------------------------------
def document_frequencies(entries: Sequence[Any]) -> tuple[dict[str, int], int]:
    """({Han character: documents holding it}, documents) over cache entries of plain texts (no header)."""
    total: Counter[int] = Counter()
    documents = 0
    for entry in entries:
        alphabet = np.asarray(entry.alphabet, dtype=np.int64)
        han = np.fromiter((c < 0x110000 and is_han(chr(c)) for c in alphabet.tolist()), dtype=bool,
                          count=len(alphabet))
        ends = np.asarray(entry.docs["end"], dtype=np.int64)
        documents += len(ends)
        local = np.asarray(entry.symbols)
        doc = np.repeat(np.arange(len(ends), dtype=np.int64), np.diff(np.concatenate([[0], ends])))
        keep = han[local]
        pairs = np.unique(doc[keep] * len(alphabet) + local[keep])
        counts = np.bincount(pairs % len(alphabet), minlength=len(alphabet))
        for i in np.flatnonzero(counts):
            total[int(alphabet[i])] += int(counts[i])
    return {chr(c): n for c, n in sorted(total.items())}, documents


def header_values(entry: Any, name: str, select: np.ndarray | None = None, longest: int = 64) -> Counter[str]:
    """How often each value of header field `name` occurs in a cache entry of headed documents (the documents
    `select` chooses; values longer than `longest` characters are cut there)."""
    alphabet = np.asarray(entry.alphabet, dtype=np.int64)
    where = np.flatnonzero(alphabet == MARKERS + RESERVED.index(TOKEN_OF[name]))
    if len(where) == 0:
        return Counter()
    symbols = entry.symbols
    at = np.flatnonzero(np.asarray(symbols) == where[0])
    if select is not None:
        doc = np.searchsorted(np.asarray(entry.docs["end"], dtype=np.int64), at, side="right")
        at = at[np.asarray(select, dtype=bool)[doc]]
    spans = at[:, None] + 1 + np.arange(longest)
    spans = np.minimum(spans, len(symbols) - 1)
    codes = alphabet[np.asarray(symbols)[spans]]
    stop = (codes - MARKERS >= 0) & (codes - MARKERS < len(RESERVED))
    length = np.where(stop.any(axis=1), stop.argmax(axis=1), longest)
    out: Counter[str] = Counter()
    for row, n in zip(codes.tolist(), length.tolist(), strict=True):
        out["".join(chr(c) for c in row[:n] if c < 0x110000)] += 1
    return out
