"""The shape of a poem: its clauses (the runs of characters between punctuation marks) and their lengths.

Punctuation is read as a pause (，、；：) or a stop (。？！); a line break without punctuation ends a clause too.
Quotation marks, brackets and spaces are ignored. Any other character counts as part of a clause (a missing
character written □ keeps its place), so a clause's length is what a reader counts.
"""

from __future__ import annotations

from dataclasses import dataclass

PAUSE, STOP = "，", "。"
PAUSES = "，、；：,;:"
STOPS = "。？！.?!"
IGNORED = " \t\r\u3000“”‘’「」『』《》〈〉()（）[]【】\"'·・…—-"


@dataclass(frozen=True)
class Clause:
    text: str
    mark: str  # PAUSE, STOP or "" (ended by a line break or the end of the text)

    def __len__(self) -> int:
        return len(self.text)


def clauses(text: str) -> list[Clause]:
    """The clauses of `text`, in order."""
    out: list[Clause] = []
    current: list[str] = []

    def close(mark: str) -> None:
        if current:
            out.append(Clause("".join(current), mark))
            current.clear()
        elif mark and out and not out[-1].mark:
            out[-1] = Clause(out[-1].text, mark)  # "line\n。" is still one clause

    for ch in text:
        if ch in PAUSES:
            close(PAUSE)
        elif ch in STOPS:
            close(STOP)
        elif ch == "\n":
            close("")
        elif ch not in IGNORED:
            current.append(ch)
    close("")
    return out


def shape(parts: list[Clause] | list[tuple[int, str]]) -> str:
    """'5，5。5，5。': clause lengths and marks, as text."""
    return "".join(f"{len(c)}{c.mark}" if isinstance(c, Clause) else f"{c[0]}{c[1]}" for c in parts)
