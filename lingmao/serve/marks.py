"""The tone and rhyme marks of a finished poem, as JSON for the page: per character its tone (平, 仄, either,
unknown), whether it is a rhyme position (and rhymes), whether it breaks the tonal pattern; and the verdict.

The verdict comes from `lingmao.verse.checker.check` (form given, or detected for free text); the marks are those
of `lingmao.verse.notation`. Clauses are counted with the rules of `lingmao.verse.shape`, which the checker's line
numbers refer to.
"""

from __future__ import annotations

from typing import Any

from lingmao.verse.checker import check
from lingmao.verse.han import is_han
from lingmao.verse.notation import EITHER, LEVEL, OBLIQUE, UNKNOWN, mark
from lingmao.verse.shape import IGNORED, PAUSES, STOPS

TONE_OF_MARK = {LEVEL: "平", OBLIQUE: "仄", EITHER: "either", UNKNOWN: "unknown"}


def clause_positions(text: str) -> list[tuple[int, int] | None]:
    """For each character of `text`: (1-based clause, 1-based place in the clause), or None outside clauses."""
    out: list[tuple[int, int] | None] = []
    clause, place = 0, 0
    for ch in text:
        if ch in PAUSES or ch in STOPS or ch == "\n" or ch in IGNORED:
            if ch not in IGNORED:
                place = 0  # the clause (if any) is closed
            out.append(None)
            continue
        if place == 0:
            clause += 1
        place += 1
        out.append((clause, place))
    return out


def poem_marks(
    text: str, form: str | None = None, tune: str | None = None, rhyme_mode: str = "pingshui", title: str | None = None
) -> dict[str, Any]:
    """`{"text", "lines": [[{"ch", "tone", "mark", "rhyme", "fault"}, ...], ...], "verdict": {...}}`.

    `tone`: 平, 仄, either (polyphonic), unknown (not in the Pingshui table), or null (not a Han character).
    `rhyme`: null (not a rhyme position), "ok" or "miss". `fault`: the tonal fault at this character, or null.
    `repeat`: "重韵" (a rhyme character that ends another rhyming line too), "重字" (a character used in another
    place of the poem, 叠字 aside: `lingmao.verse.checker`), or null.
    Free text (form None) is checked as the form it has, if any (`lingmao.verse.checker.detect`).
    """
    verdict = check(text, form, tune=tune, title=title, rhyme_mode=rhyme_mode)
    rhymes = {m.line: m for m in verdict.rhymes}
    last_place: dict[int, int] = {}
    positions = clause_positions(text)
    for pos in positions:
        if pos is not None:
            last_place[pos[0]] = pos[1]
    faults: dict[tuple[int, int], str] = {(v.line, v.char): v.message for v in verdict.violations}
    repeats = {place: "重字" for r in verdict.repeated_chars for place in r.places}
    repeats.update({place: "重韵" for r in verdict.repeated_rhymes for place in r.places})
    lines: list[list[dict[str, Any]]] = [[]]
    for ch, pos in zip(text, positions, strict=True):
        if ch == "\n":
            lines.append([])
            continue
        cell: dict[str, Any] = {"ch": ch, "tone": None, "mark": None, "rhyme": None, "fault": None, "repeat": None}
        if is_han(ch):
            cell["mark"] = mark(ch)
            cell["tone"] = TONE_OF_MARK[cell["mark"]]
        if pos is not None:
            clause, place = pos
            rhyme = rhymes.get(clause)
            if rhyme is not None and place == last_place[clause]:
                cell["rhyme"] = "ok" if rhyme.ok else "miss"
            cell["fault"] = faults.get(pos)
            cell["repeat"] = repeats.get(pos)
        lines[-1].append(cell)
    return {
        "text": text,
        "title": title,
        "lines": lines,
        "verdict": {
            "form": verdict.form,
            "form_name": verdict.form_name(),
            "tune": verdict.tune,
            "detected": verdict.detected,
            "pattern": verdict.pattern,
            "rhyme_mode": verdict.rhyme_mode,
            "rhyme_class": verdict.rhyme_class,
            "format_ok": verdict.format_ok,
            "rhyme_ok": verdict.rhyme_ok,
            "tones_lenient": verdict.tones_lenient,
            "problems": verdict.format_problems + verdict.acrostic_problems + verdict.rhyme_problems
            + [f"重韵: {r}" for r in verdict.repeated_rhymes] + [f"重字: {r}" for r in verdict.repeated_chars]
            + [str(v) for v in verdict.violations],
        },
    }
