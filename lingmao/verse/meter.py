"""Tonal patterns (格律) of regulated verse: 五绝, 七绝, 五律, 七律.

Every line of regulated verse is one of four types, named here by their five-character form:

    A 仄仄平平仄    B 平平仄仄平    C 平平平仄仄    D 仄仄仄平平

A seven-character line puts two characters of the opposite tone in front (A: 平平仄仄平平仄). The lines of a poem
follow from its first line by 对 (the two lines of a couplet have opposite tones at their second character) and 粘
(the first line of a couplet has the tone of the line before at its second character): A B C D A B C D or
C D A B C D A B. A poem is 平起 or 仄起 by the tone of its second character; when its first line rhymes, that line
is the level-ending type with the same second character (A becomes D, C becomes B). So each form has four
standard patterns, 平起 / 仄起 x first line rhymed or not.

Checking modes:
- strict: every position as the pattern says;
- lenient: the customary 一三五不论 -- the 1st, 3rd and 5th characters are free -- except where freedom would
  make a fault: 孤平 (in a B line, 平平仄仄平, the 平 of the core's 2nd character between two 仄: the core's 1st
  and 3rd characters must not both be 仄), 三平尾 (in a D line the core's 3rd character stays 仄) and 三仄尾 (in
  a C line it stays 平). The core is the last five characters. Rescues (拗救) are not recognised.

A polyphonic character fits either tone; a character missing from the table fits anything and is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from lingmao.verse import pingshui
from lingmao.verse.pingshui import PING, ZE

CORES: dict[str, str] = {"A": "仄仄平平仄", "B": "平平仄仄平", "C": "平平平仄仄", "D": "仄仄仄平平"}
STARTS = ("平起", "仄起")
MODES = ("strict", "lenient")
_OPPOSITE = {PING: ZE, ZE: PING}


def line_tones(line_type: str, chars: int) -> str:
    """The tones of a line of `line_type` (A-D) with 5 or 7 characters."""
    core = CORES[line_type]
    if chars == 5:
        return core
    return "".join(_OPPOSITE[t] for t in core[:2]) + core


@dataclass(frozen=True)
class Pattern:
    """One of the four standard patterns of a form of `lines` lines of `chars` characters."""

    chars: int
    lines: int
    start: str  # 平起 or 仄起: the tone of the second character of line 1
    first_rhymes: bool

    @property
    def types(self) -> tuple[str, ...]:
        start_tone = self.start[0]
        # The unrhymed first line: the one of A, C whose second character has the start tone.
        first = next(t for t in "AC" if line_tones(t, self.chars)[1] == start_tone)
        cycle = "ABCD"
        seq = [cycle[(cycle.index(first) + i) % 4] for i in range(self.lines)]
        if self.first_rhymes:
            seq[0] = {"A": "D", "C": "B"}[seq[0]]
        return tuple(seq)

    @property
    def tones(self) -> tuple[str, ...]:
        return tuple(line_tones(t, self.chars) for t in self.types)

    @property
    def rhyme_lines(self) -> tuple[int, ...]:
        """0-based indices of the rhyming lines: the even lines, and line 1 when it rhymes."""
        return ((0,) if self.first_rhymes else ()) + tuple(range(1, self.lines, 2))

    @property
    def name(self) -> str:
        return f"{self.start}首句{'入' if self.first_rhymes else '不入'}韵"


def patterns(chars: int, lines: int) -> tuple[Pattern, ...]:
    """The four standard patterns: 平起 before 仄起, first line unrhymed before rhymed."""
    return tuple(Pattern(chars, lines, start, rhymes) for start in STARTS for rhymes in (False, True))


@dataclass(frozen=True)
class LineRule:
    """What a mode requires of one line.

    `required[i]` is 平, 仄 or None (free); `reasons[i]` names the rule behind a requirement the lenient mode
    keeps at an odd position (三平尾, 三仄尾). `lone_level` = (i, j): positions that must not both be 仄 (孤平).
    """

    tones: str
    required: tuple[str | None, ...]
    reasons: tuple[str | None, ...]
    lone_level: tuple[int, int] | None


@lru_cache(maxsize=64)
def line_rule(line_type: str, chars: int, mode: str) -> LineRule:
    """The rule for one line of `line_type` in `mode` (strict or lenient)."""
    tones = line_tones(line_type, chars)
    if mode == "strict":
        return LineRule(tones, tuple(tones), (None,) * chars, None)
    if mode != "lenient":
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    # 一三五不论: the even positions (1-based) and the last one stay fixed.
    required: list[str | None] = [t if (i % 2 == 1 or i == chars - 1) else None for i, t in enumerate(tones)]
    reasons: list[str | None] = [None] * chars
    core = chars - 5
    lone = None
    if line_type == "D":
        required[core + 2], reasons[core + 2] = ZE, "三平尾"
    elif line_type == "C":
        required[core + 2], reasons[core + 2] = PING, "三仄尾"
    elif line_type == "B":
        lone = (core, core + 2)
    return LineRule(tones, tuple(required), tuple(reasons), lone)


@dataclass(frozen=True)
class Violation:
    """A fault at one position (1-based line and character)."""

    line: int
    char: int
    message: str
    kind: str  # "tone" (a fixed position), "三平尾", "三仄尾", "孤平", "free" (strict only), "rhyme"

    def __str__(self) -> str:
        return f"line {self.line}, char {self.char}: {self.message}"


def _shown(ch_tones: frozenset[str]) -> str:
    return ZE if ch_tones == {ZE} else PING


def _relation(lines: list[str], i: int) -> str:
    """' (失对 with line N)' / ' (失粘 with line N)' when the 2nd character breaks that relation, else ''."""
    if i == 0:
        return ""
    here, before = pingshui.tones(lines[i][1]), pingshui.tones(lines[i - 1][1])
    if len(here) != 1 or len(before) != 1:
        return ""
    if i % 2 == 1 and here == before:
        return f" (失对 with line {i})"
    if i % 2 == 0 and here != before:
        return f" (失粘 with line {i})"
    return ""


def tone_violations(lines: list[str], pattern: Pattern, mode: str) -> list[Violation]:
    """The faults of `lines` (each `pattern.chars` characters) against `pattern` in `mode`."""
    found: list[Violation] = []
    for i, (line, line_type) in enumerate(zip(lines, pattern.types, strict=True)):
        rule = line_rule(line_type, pattern.chars, mode)
        for j, (ch, want) in enumerate(zip(line, rule.required, strict=True)):
            have = pingshui.tones(ch)
            if want is None or not have or want in have:
                continue
            reason = rule.reasons[j]
            message = f"{_shown(have)} where {want} is required"
            if reason:
                message += f" ({reason})"
            elif j == 1:
                message += _relation(lines, i)
            found.append(Violation(i + 1, j + 1, message, reason or "tone"))
        if rule.lone_level is not None:
            a, b = rule.lone_level
            if pingshui.tones(line[a]) == {ZE} and pingshui.tones(line[b]) == {ZE}:
                found.append(Violation(
                    i + 1, a + 1, f"孤平: 仄 at chars {a + 1} and {b + 1} leave the 平 of char {a + 2} alone", "孤平"
                ))
    return found


def liberties(lines: list[str], pattern: Pattern) -> list[Violation]:
    """Positions where `lines` leave the strict pattern but lenient checking allows it (the poet's liberties)."""
    lenient = {(v.line, v.char) for v in tone_violations(lines, pattern, "lenient")}
    return [
        Violation(v.line, v.char, v.message, "free")
        for v in tone_violations(lines, pattern, "strict")
        if (v.line, v.char) not in lenient
    ]
