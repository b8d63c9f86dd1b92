"""Ci tunes (词牌): templates of clause lengths, punctuation, stanza break and rhyme positions.

The templates are derived from the corpus's Song ci by `scripts/build_tunes.py` (its docstring gives the
rules) and kept in `data/tunes.json`. A shape is written like `7。7。7。|7，7。7。`: clause lengths, the mark
after each clause (，a pause, 。a stop) and `|` at the stanza break. Rhymes are sets of clause ends that rhyme
together (in one section of the 词林正韵, `lingmao.verse.cilin`), each end with the tone it takes (平, 仄, or ""
for either); a tune that changes rhyme has several sets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lingmao.errors import LingmaoError

TUNES_FILE = Path(__file__).parent / "data" / "tunes.json"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Tune:
    name: str
    aliases: tuple[str, ...]
    poems: int  # poems of the tune in the corpus
    agreeing: int  # of them, poems of exactly this shape
    clauses: tuple[tuple[int, str], ...]  # (length, mark)
    stanza: int | None  # index of the first clause of the second stanza; None: one stanza
    rhymes: tuple[tuple[tuple[int, str], ...], ...]  # sets of (clause index, tone)

    @property
    def characters(self) -> int:
        return sum(n for n, _ in self.clauses)

    def rhyme_at(self, clause: int) -> tuple[int, str] | None:
        """(set index, tone) when clause `clause` ends in a rhyme."""
        for s, members in enumerate(self.rhymes):
            for index, tone in members:
                if index == clause:
                    return s, tone
        return None

    @property
    def shape(self) -> str:
        """7。7。7。|7，7。7。"""
        return "".join(
            f"{n}{m}" + ("|" if self.stanza == i + 1 else "") for i, (n, m) in enumerate(self.clauses)
        )

    def marked_shape(self) -> str:
        """The shape with each rhyme's tone after its length, and a set letter when the tune changes rhyme."""
        out = []
        for i, (n, m) in enumerate(self.clauses):
            rhyme = self.rhyme_at(i)
            tag = ""
            if rhyme is not None:
                tag = (_LETTERS[rhyme[0]] if len(self.rhymes) > 1 else "") + (rhyme[1] or "韵")
            out.append(f"{n}{tag}{m}" + ("|" if self.stanza == i + 1 else ""))
        return "".join(out)


def _parse_shape(text: str) -> tuple[tuple[tuple[int, str], ...], int | None]:
    clauses, stanza = [], None
    for number, mark, bar in re.findall(r"(\d+)([，。])(\|?)", text):
        clauses.append((int(number), mark))
        if bar:
            stanza = len(clauses)
    return tuple(clauses), stanza


@lru_cache(maxsize=1)
def tunes() -> tuple[Tune, ...]:
    """Every tune of the table, the most frequent in the corpus first."""
    data = json.loads(TUNES_FILE.read_text(encoding="utf-8"))
    out = []
    for entry in data["tunes"]:
        clauses, stanza = _parse_shape(entry["shape"])
        rhymes = tuple(tuple((int(i), str(t)) for i, t in members) for members in entry["rhymes"])
        out.append(Tune(entry["name"], tuple(entry["aliases"]), int(entry["poems"]), int(entry["agreeing"]),
                        clauses, stanza, rhymes))
    return tuple(out)


def find_tune(name: str) -> Tune | None:
    """The tune called `name` (or with `name` as an alias, or the tune part of a title 'alias・tune'), else None."""
    from lingmao.verse.pingshui import simplified

    name = simplified(name.strip())  # the table is in simplified characters, as the ci are
    if not name:
        return None
    for candidate in (name, name.split("・")[-1]):
        for tune in tunes():
            if tune.name == candidate:
                return tune
        for tune in tunes():
            if candidate in tune.aliases:
                return tune
    return None


LISTED_BY = "list them with list_tunes=true"  # the command line's way to see them all


def tune_named(name: str, listed_by: str = LISTED_BY) -> Tune:
    """Like `find_tune`, but an unknown name is a user error naming a few known tunes and, in `listed_by`, where
    to see them all (the web API says `GET /api/info`)."""
    tune = find_tune(name)
    if tune is None:
        known = " ".join(t.name for t in tunes()[:8])
        raise LingmaoError(f"tune: '{name}' is not one of the {len(tunes())} known tunes ({known}, ...; {listed_by})")
    return tune
