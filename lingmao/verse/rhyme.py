"""Rhyme systems and the verdict on a set of rhyming positions.

A rhyme system names the classes a character can rhyme in, for a tone (平, 仄, or None for either):
- `pingshui`: the 106 Pingshui groups (a group has one tone: 一东 is 平, 一董 仄), for regulated verse;
- `cilin`: the 19 sections of the 词林正韵, each with level and oblique characters, for ci;
- `modern`: today's Mandarin finals (`lingmao.verse.modern`), tone from the Pingshui table when one is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lingmao.verse import cilin, modern, pingshui

SYSTEMS = ("pingshui", "cilin", "modern")


def class_names(system: str) -> tuple[str, ...]:
    """Every class of `system`, in a fixed order (the row order of the vocabulary tables)."""
    if system == "pingshui":
        return tuple(g.name for g in pingshui.groups())
    if system == "cilin":
        return tuple(cilin.section_name(n) for n in cilin.SECTION_NUMBERS)
    if system == "modern":
        return modern.CLASS_NAMES
    raise ValueError(f"rhyme system {system!r} is not one of {SYSTEMS}")


def classes(ch: str, system: str, tone: str | None = None) -> frozenset[str]:
    """The classes `ch` rhymes in under `system`, read with `tone` (None = any reading)."""
    if system == "pingshui":
        return frozenset(g.name for g in pingshui.readings(ch) if tone is None or g.tone == tone)
    if system == "cilin":
        return frozenset(cilin.section_name(s) for s, t in cilin.readings(ch) if tone is None or t == tone)
    if system == "modern":
        name = modern.rhyme_class(ch)
        if name is None or (tone is not None and tone not in pingshui.tones(ch)):
            return frozenset()
        return frozenset((name,))
    raise ValueError(f"rhyme system {system!r} is not one of {SYSTEMS}")


@dataclass(frozen=True)
class RhymeVerdict:
    """The class most of the positions share, and the positions that are not in it."""

    shared: str | None
    misses: tuple[int, ...]  # indices into the positions given

    @property
    def ok(self) -> bool:
        return self.shared is not None and not self.misses


def shared_class(chars: Sequence[str], system: str, tones: Sequence[str | None] | None = None) -> RhymeVerdict:
    """The class shared by the most of `chars` (each read with its tone from `tones`); ties: the first in order."""
    tones = tones if tones is not None else [None] * len(chars)
    sets = [classes(ch, system, tone) for ch, tone in zip(chars, tones, strict=True)]
    order = class_names(system)
    best, count = None, 0
    for name in order:
        n = sum(name in s for s in sets)
        if n > count:
            best, count = name, n
    if best is None:
        return RhymeVerdict(None, tuple(range(len(chars))))
    return RhymeVerdict(best, tuple(i for i, s in enumerate(sets) if best not in s))
