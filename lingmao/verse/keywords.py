"""Enforced keywords: each keyword appears in every sample, by construction, like the acrostic.

A keyword (one character or several) must appear as a run of consecutive characters. The model writes freely
as long as the keywords still missing can be placed in what is left of the text; when they could no longer all
be placed later, the step is restricted to the first character of a keyword that must start here, and the rest
of that keyword follows. So a keyword lands where the model puts it or, at the latest, where it still fits.

Where a keyword may be forced is fixed before sampling, per tonal pattern of the form (`FormConstraint`'s
variants; free text has one, where every position will do): character positions that no prompt, acrostic or
rhyme fixes, inside one line (or ci clause), where each character fits what the pattern needs there (平, 仄 or
either; a position that can turn 平 by the 孤平 rule only takes a character that can be read 平). From these,
a table per pattern says whether the keywords of each subset still fit from each position on (disjoint runs; up
to `MAX_KEYWORDS` keywords).

While sampling, a sample keeps to the patterns that are still alive in the form's own state and still have room
for its missing keywords: at a free step it may write what one of those patterns admits there; when none would
have room after this step, a keyword starts here under a pattern that has room for it and the others after it.
A forced character fits its pattern and is not a rhyme, so that pattern stays alive, and the form's guarantee
(no dead end) holds with the keywords. Keywords that cannot all be placed (too long, or no position fits their
tones) are a one-line error before sampling.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from lingmao.errors import LingmaoError
from lingmao.verse.han import is_han
from lingmao.verse.vocab import LEVEL

MAX_KEYWORDS = 8
_SEPARATORS = re.compile(r"[\s,，、;；]+")


def normalize_keywords(value: str | Iterable[str] | None) -> list[str]:
    """keywords= -> a list of keywords: a list as it is; a string split at spaces, commas and 、; empty ones and
    repeats left out."""
    if value is None:
        return []
    items = _SEPARATORS.split(value) if isinstance(value, str) else [str(v) for v in value]
    return list(dict.fromkeys(k.strip() for k in items if k and k.strip()))


class KeywordConstraint:
    """Masks that make every keyword appear in each sample (see the module docstring).

    `form`: the `FormConstraint` of the poem, or None for free text of `steps` tokens. `mask(step, generated)`
    returns the tokens allowed at this step, bool [batch, V]. With a form, call the form's `mask` for the same
    step first (this reads the state it has just brought up to date) and combine both masks with `&`.
    """

    def __init__(self, tok: Tokenizer, keywords: Sequence[str], steps: int, form: Any = None, prompt: str = "",
                 eos_id: int | None = None) -> None:
        self.keywords = list(keywords)
        if len(self.keywords) > MAX_KEYWORDS:
            raise LingmaoError(f"keywords: {len(self.keywords)} given; at most {MAX_KEYWORDS} can be enforced")
        self.form, self.size, self.eos_id, self.prompt = form, tok.get_vocab_size(), eos_id, prompt
        self.ids = [self._ids(tok, k) for k in self.keywords]
        self.positions = (len(form.slots) - form.start) if form is not None else steps
        patterns = form.variants if form is not None else [None]
        # ok[v, i, q]: keyword i may be forced from position q on under pattern v; fits[v, q, m]: the keywords
        # of bit set m all fit at positions q and later under pattern v.
        self.ok = np.zeros((len(patterns), len(self.keywords), self.positions), dtype=bool)
        for v, pattern in enumerate(patterns):
            for i, ids in enumerate(self.ids):
                for q in range(self.positions - len(ids) + 1):
                    self.ok[v, i, q] = self._same_run(q, len(ids)) and all(
                        self._fits(pattern, q + j, t) for j, t in enumerate(ids))
        self.fits = np.stack([self._table(self.ok[v]) for v in range(len(patterns))])
        self.missing_at_start = sum(1 << i for i, k in enumerate(self.keywords) if k not in prompt)
        if not self.fits[:, 0, self.missing_at_start].any():
            raise LingmaoError(self._why_not())
        self._state: _State | None = None

    # ------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------
    def _ids(self, tok: Tokenizer, keyword: str) -> list[int]:
        ids = []
        for ch in keyword:
            i = tok.token_to_id(ch)
            if i is None:
                raise LingmaoError(f"keywords: '{ch}' (of '{keyword}') is not in the model's vocabulary")
            if self.form is not None and not is_han(ch):
                raise LingmaoError(f"keywords: '{ch}' (of '{keyword}') is not a Han character; a verse form has "
                                   "room for Han characters only")
            ids.append(i)
        return ids

    def _fits(self, pattern: Any, q: int, token: int) -> bool:
        """Whether `token` may be forced at position q under `pattern` (see the module docstring)."""
        form = self.form
        if form is None:
            return True
        index = form.start + q
        slot = form.slots[index]
        if not slot.is_char or (slot.column == 0 and slot.line in form.acrostic):
            return False
        k = form.char_index[index]
        masks = form.tables.tone_masks
        return (k not in form.fixed and bool(masks[pattern.need[k], token])
                and all(k != position for members in pattern.rhymes for position, _ in members)
                and (all(k != b for _, b in pattern.lone) or bool(masks[LEVEL, token])))

    def _same_run(self, q: int, length: int) -> bool:
        if self.form is None:
            return True
        slots = self.form.slots[self.form.start + q : self.form.start + q + length]
        return all(s.is_char and s.line == slots[0].line for s in slots)

    def _table(self, ok: np.ndarray) -> np.ndarray:
        """fits[q, m] for one pattern, from the last position back: skip q, or start a keyword of m there."""
        n, subsets = self.positions, 1 << len(self.keywords)
        fits = np.zeros((n + 1, subsets), dtype=bool)
        fits[:, 0] = True
        sets = np.arange(subsets)
        for q in range(n - 1, -1, -1):
            row = fits[q + 1].copy()
            for i, ids in enumerate(self.ids):
                if q + len(ids) <= n and ok[i, q]:
                    with_i = sets[(sets >> i) & 1 == 1]
                    row[with_i] |= fits[q + len(ids), with_i ^ (1 << i)]
            fits[q] = row
        return fits

    def _why_not(self) -> str:
        if self.form is None:
            where = f"{self.positions} new tokens (max_new_tokens)"
        else:
            where = self.form.what + (f" tones={self.form.tones}" if self.form.tones != "off" else "")
        for i, keyword in enumerate(self.keywords):
            if (self.missing_at_start >> i) & 1 and not self.ok[:, i].any():
                hint = " (tones=off frees the tones)" if self.form is not None and self.form.tones != "off" else ""
                return f"keywords: '{keyword}' fits nowhere in {where}{hint}"
        return f"keywords: {', '.join(self.keywords)} do not fit together in {where}"

    # ------------------------------------------------------------------------------------------
    # Decoding
    # ------------------------------------------------------------------------------------------
    def mask(self, step: int, generated: torch.Tensor) -> torch.Tensor:
        batch, device = generated.size(0), generated.device
        state = self._state
        if state is None or state.batch != batch or state.consumed > step:
            state = self._state = _State(self, batch)
        while state.consumed < step:
            state.fold(generated[:, state.consumed].tolist())
        return state.allowed(step).to(device)


class _State:
    """Per sample: the keywords still missing (a bit set), the text's tail, the rest of a keyword being forced."""

    def __init__(self, c: KeywordConstraint, batch: int) -> None:
        self.c, self.batch, self.consumed = c, batch, 0
        self.missing = [c.missing_at_start] * batch
        self.tail = [c.prompt for _ in range(batch)]
        self.queue: list[list[int]] = [[] for _ in range(batch)]
        self.starting: list[list[int]] = [[] for _ in range(batch)]  # keywords that may start at this step
        self.longest = max(map(len, c.keywords))
        self.chars = {t: ch for k, ids in zip(c.keywords, c.ids, strict=True) for ch, t in zip(k, ids, strict=True)}

    def allowed(self, q: int) -> torch.Tensor:
        c = self.c
        out = torch.ones(self.batch, c.size, dtype=torch.bool)
        form = c.form
        # The form's decoding state for this step (its mask has just run): which patterns each sample keeps.
        form_state = form._state if form is not None else None
        alive = form_state.alive.cpu().numpy() if form_state is not None else np.ones((self.batch, 1), dtype=bool)
        k = form.char_index.get(form.start + q) if form is not None else None
        self.starting = [[] for _ in range(self.batch)]
        per_pattern: dict[int, torch.Tensor] = {}
        for b in range(self.batch):
            m = self.missing[b]
            if self.queue[b]:
                out[b] = False
                out[b, self.queue[b][0]] = True
                continue
            if m and form is None and c.eos_id is not None:
                out[b, c.eos_id] = False
            if m == 0:
                continue
            room = [v for v in np.flatnonzero(alive[b]) if c.fits[v, q + 1, m]]
            if room:
                if k is not None and len(room) < alive[b].sum():  # write only what keeps a pattern with room
                    for v in room:
                        if v not in per_pattern:
                            per_pattern[v] = form_state.variant_allowed(int(v), k).cpu()
                    out[b] = torch.stack([per_pattern[v][b] for v in room]).any(0)
                continue
            for v in np.flatnonzero(alive[b]):  # no room later: a keyword starts here
                for i, ids in enumerate(c.ids):
                    if (m >> i) & 1 and c.ok[v, i, q] and c.fits[v, q + len(ids), m & ~(1 << i)] \
                            and i not in self.starting[b]:
                        self.starting[b].append(i)
            if not self.starting[b]:  # impossible by construction (see the module docstring)
                raise RuntimeError(f"keywords: no keyword can start at step {q} although one must")
            out[b] = False
            out[b, [c.ids[i][0] for i in self.starting[b]]] = True
        return out

    def fold(self, tokens: list[int]) -> None:
        """Take in the tokens sampled at step `consumed`."""
        c = self.c
        for b, t in enumerate(tokens):
            if self.queue[b]:
                self.queue[b].pop(0)
            elif self.starting[b]:
                i = next(i for i in self.starting[b] if c.ids[i][0] == t)
                self.queue[b] = list(c.ids[i][1:])
            self.tail[b] = (self.tail[b] + self.chars.get(t, "\0"))[-self.longest:]
            for i, keyword in enumerate(c.keywords):
                if (self.missing[b] >> i) & 1 and self.tail[b].endswith(keyword):
                    self.missing[b] &= ~(1 << i)
        self.starting = [[] for _ in range(self.batch)]
        self.consumed += 1
