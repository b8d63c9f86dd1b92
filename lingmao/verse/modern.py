"""Modern rhyme classes (`rhyme=modern`): the final of the modern Mandarin reading, tone ignored.

Finals (pypinyin) are grouped into classes close to the 14 rhymes of 中华新韵 (see `RHYME_CLASSES`). This is
how rhymes sound today, not the Middle Chinese rhyme system of 平水韵 (`lingmao.verse.pingshui`); polyphonic
characters are judged by their most common modern reading only.
"""

from __future__ import annotations

from functools import lru_cache

from lingmao.verse.han import is_han

# Modern pinyin finals (pypinyin Style.FINALS, strict: ü written v) -> rhyme class.
# a/ia/ua; o/uo/e; ie/üe; ai/uai; ei/ui; ao/iao; ou/iu; an/ian/uan/üan; en/in/un/ün; ang/iang/uang;
# eng/ing/ong/iong; i/-i/er/ü; u.
RHYME_CLASSES: dict[str, tuple[str, ...]] = {
    "a": ("a", "ia", "ua"),
    "e": ("o", "uo", "e", "ê"),
    "ie": ("ie", "ve"),
    "ai": ("ai", "uai"),
    "ei": ("ei", "uei", "ui"),
    "ao": ("ao", "iao"),
    "ou": ("ou", "iou", "iu"),
    "an": ("an", "ian", "uan", "van"),
    "en": ("en", "in", "uen", "un", "vn"),
    "ang": ("ang", "iang", "uang"),
    "eng": ("eng", "ing", "ueng", "ong", "iong"),
    "i": ("i", "er", "v"),
    "u": ("u",),
}
CLASS_NAMES: tuple[str, ...] = tuple(RHYME_CLASSES)
_FINAL_TO_CLASS = {final: name for name, finals in RHYME_CLASSES.items() for final in finals}


def pinyin_final(ch: str) -> str | None:
    """The tone-less final of `ch`'s most common modern reading (pypinyin, ü as v), or None."""
    from pypinyin import Style, pinyin

    if not is_han(ch):
        return None
    found = pinyin(ch, style=Style.FINALS, strict=True, errors="ignore")
    return (found[0][0] or None) if found and found[0] else None


@lru_cache(maxsize=65536)
def rhyme_class(ch: str) -> str | None:
    """The modern rhyme class (a key of `RHYME_CLASSES`) of a Han character, or None when it has no reading."""
    final = pinyin_final(ch)
    return _FINAL_TO_CLASS.get(final) if final else None
