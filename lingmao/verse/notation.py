"""Tone marks under the lines of a poem, as 格律 books print them: ○ 平, ● 仄, the rhyme group at the line end.

A polyphonic character (both 平 and 仄 in the Pingshui table, e.g. 看 思 重) is marked ◐; a character the
table does not list is marked ◌. Punctuation is kept, so with a font where the marks are as wide as the
characters (most CJK fonts) each mark sits under its character.
"""

from __future__ import annotations

from lingmao.verse import pingshui
from lingmao.verse.checker import Verdict
from lingmao.verse.han import is_han
from lingmao.verse.pingshui import PING, ZE
from lingmao.verse.shape import clauses

LEVEL, OBLIQUE, EITHER, UNKNOWN = "○", "●", "◐", "◌"
LEGEND = f"{LEVEL} 平  {OBLIQUE} 仄  {EITHER} 平 or 仄 (polyphonic)  {UNKNOWN} not in the Pingshui table"


def mark(ch: str) -> str:
    """The tone mark of one character; anything that is not a Han character is kept as it is."""
    if not is_han(ch):
        return ch
    tones = pingshui.tones(ch)
    if tones == {PING}:
        return LEVEL
    if tones == {ZE}:
        return OBLIQUE
    return EITHER if tones else UNKNOWN


def tone_marks(verdict: Verdict) -> str:
    """The poem of `verdict`, each line followed by its marks and the rhyme group(s) it ends in."""
    by_clause = {m.line: m for m in verdict.rhymes}
    out: list[str] = []
    clause = 0
    for line in verdict.text.split("\n"):
        n = len(clauses(line))
        groups: list[str] = []
        for index in range(clause + 1, clause + n + 1):
            m = by_clause.get(index)
            if m is not None:
                name = m.shared or f"{m.char}×"  # × a rhyme position that does not rhyme
                if name not in groups:
                    groups.append(name)
        clause += n
        out.append(line)
        if line.strip():
            out.append("".join(mark(ch) for ch in line).rstrip() + ("  " + " ".join(groups) if groups else ""))
    return "\n".join(out)
