"""Character-level tokenizer (HF `tokenizers`, saved as tokenizer.json).

Classical Chinese has no spaces and most characters are words or morphemes, so each character is one
token; punctuation, spaces and newlines are kept as tokens of their own. Every document is wrapped as
`<bos> text <eos>`; characters never seen in training map to `<unk>`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lingmao.errors import LingmaoError

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]


def _empty_char_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    # One token per character, newlines included ([\s\S] matches any character).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def train_tokenizer(texts: Iterable[str], min_frequency: int = 1) -> Tokenizer:
    """Build a character vocabulary from `texts` (an iterator is fine: it is read once)."""
    tok = _empty_char_tokenizer()
    trainer = trainers.WordLevelTrainer(
        vocab_size=10_000_000, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)]
    )
    return tok


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


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write atomically (temporary file + rename), so a half-written tokenizer.json is never read."""
    from lingmao.io import atomic_write_bytes

    atomic_write_bytes(Path(path), tok.to_str(pretty=False).encode("utf-8"))


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """A short hash of the vocabulary and settings: part of every token cache key."""
    import hashlib

    data = json.loads(tok.to_str())
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
