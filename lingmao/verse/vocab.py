"""Per-tokenizer tables for constrained decoding, built once per vocabulary (cached by its fingerprint).

`tone_masks[need]` says which tokens may fill a position that needs: FREE (any Han character), KNOWN (a Han
character of known tone), LEVEL (can be read 平) or OBLIQUE (can be read 仄). `rhyme_masks(tok, system)[tone,
class]` says which tokens rhyme in `class` when read with `tone` (0 any, 1 平, 2 仄). `variant_ids(tok)` maps
each token to one representative of the tokens that are the same character in simplified form (華 and 华). A
decoding step then costs a few tensor operations, not a loop over the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from lingmao.data.tokenizer import tokenizer_fingerprint
from lingmao.verse import pingshui, rhyme
from lingmao.verse.han import is_han
from lingmao.verse.pingshui import PING, ZE

FREE, KNOWN, LEVEL, OBLIQUE = range(4)
NEED_NAMES = ("any character", "a character of known tone", "平", "仄")
RHYME_TONES: tuple[str | None, ...] = (None, PING, ZE)  # index = the tone axis of the rhyme masks


@dataclass(frozen=True)
class VocabTables:
    han: torch.Tensor  # bool [V]
    tone_masks: torch.Tensor  # bool [4, V], rows FREE, KNOWN, LEVEL, OBLIQUE
    size: int

    @property
    def level(self) -> torch.Tensor:
        return self.tone_masks[LEVEL]


def char_tone_fits(ch: str) -> torch.Tensor:
    """bool [4]: whether `ch` fills a FREE, KNOWN, LEVEL, OBLIQUE position (the tables' column for `ch`)."""
    tones = pingshui.tones(ch) if is_han(ch) else frozenset()
    return torch.tensor([is_han(ch), bool(tones), PING in tones, ZE in tones])


def char_rhyme_classes(ch: str, system: str) -> torch.Tensor:
    """bool [3, C]: the classes of `system` that `ch` rhymes in, read with any tone, 平, 仄."""
    names = rhyme.class_names(system)
    out = torch.zeros(len(RHYME_TONES), len(names), dtype=torch.bool)
    if is_han(ch):
        index = {name: i for i, name in enumerate(names)}
        for t, tone in enumerate(RHYME_TONES):
            for name in rhyme.classes(ch, system, tone):
                out[t, index[name]] = True
    return out


_TABLES: dict[str, VocabTables] = {}
_RHYMES: dict[tuple[str, str], torch.Tensor] = {}
_VARIANTS: dict[str, torch.Tensor] = {}
_CLASS_SIZES: dict[tuple[str, str, int, int, bool], torch.Tensor] = {}
_KEYS: dict[int, tuple[Tokenizer, int, str]] = {}


def _vocab_key(tok: Tokenizer) -> str:
    """`tokenizer_fingerprint(tok)`, remembered per tokenizer object and vocabulary size: computing it serialises
    the whole tokenizer (about 20 ms for 6,000 tokens), which every constrained generation would pay otherwise.
    Tokens can only be added to a tokenizer, which changes its size."""
    size = tok.get_vocab_size()
    known = _KEYS.get(id(tok))
    if known is None or known[0] is not tok or known[1] != size:
        if len(_KEYS) >= 8:
            _KEYS.pop(next(iter(_KEYS)))
        known = _KEYS[id(tok)] = (tok, size, tokenizer_fingerprint(tok))
    return known[2]


def _han_tokens(tok: Tokenizer) -> list[tuple[str, int]]:
    return [(token, i) for token, i in tok.get_vocab().items() if is_han(token)]


def vocab_tables(tok: Tokenizer) -> VocabTables:
    """Han and tone masks of `tok`'s vocabulary."""
    key = _vocab_key(tok)
    if key not in _TABLES:
        size = tok.get_vocab_size()
        masks = torch.zeros(4, size, dtype=torch.bool)
        for token, i in _han_tokens(tok):
            masks[:, i] = char_tone_fits(token)
        _TABLES[key] = VocabTables(masks[FREE].clone(), masks, size)
    return _TABLES[key]


def rhyme_masks(tok: Tokenizer, system: str) -> torch.Tensor:
    """bool [3, C, V]: token v rhymes in class c of `system` when read with tone t (0 any, 1 平, 2 仄)."""
    key = (_vocab_key(tok), system)
    if key not in _RHYMES:
        size = tok.get_vocab_size()
        masks = torch.zeros(len(RHYME_TONES), len(rhyme.class_names(system)), size, dtype=torch.bool)
        for token, i in _han_tokens(tok):
            masks[:, :, i] = char_rhyme_classes(token, system)
        _RHYMES[key] = masks
    return _RHYMES[key]


def class_sizes(tok: Tokenizer, system: str, tone: int, need: int, distinct: bool) -> torch.Tensor:
    """long [C]: per class of `system` read with `tone`, the tokens that can fill a position needing `need`;
    `distinct`: the different characters among them in simplified form (華 and 华 count once)."""
    key = (_vocab_key(tok), system, tone, need, distinct)
    if key not in _CLASS_SIZES:
        admissible = rhyme_masks(tok, system)[tone] & vocab_tables(tok).tone_masks[need]
        if distinct:
            index = variant_ids(tok).expand_as(admissible)
            present = torch.zeros(admissible.shape).scatter_reduce_(1, index, admissible.float(), reduce="amax")
            _CLASS_SIZES[key] = present.sum(-1).long()
        else:
            _CLASS_SIZES[key] = admissible.sum(-1)
    return _CLASS_SIZES[key]


def variant_ids(tok: Tokenizer) -> torch.Tensor:
    """long [V]: for each token, the smallest id of the tokens that are its Han character in simplified form (OpenCC
    t2s: 華 and 华 share one); a token that is not a Han character is its own."""
    key = _vocab_key(tok)
    if key not in _VARIANTS:
        out = torch.arange(tok.get_vocab_size())
        han = sorted(_han_tokens(tok), key=lambda pair: pair[1])
        simple = pingshui.simplified("\n".join(token for token, _ in han)).split("\n")
        first: dict[str, int] = {}
        for (_, i), s in zip(han, simple, strict=True):
            out[i] = first.setdefault(s, i)
        _VARIANTS[key] = out
    return _VARIANTS[key]
