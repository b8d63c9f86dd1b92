"""Ci rhyme sections (词林正韵, 19 部) as unions of Pingshui groups.

Song ci rhyme more loosely than regulated verse: the 词林正韵 (Ge Zai, 1821) merges neighbouring Pingshui
groups, and 上声 and 去声 of a section rhyme together. The book itself lists characters; here each section is the
union of the Pingshui groups it covers, which is exact except for the groups the book splits between two
sections (十灰, 九佳, 十三元 and their oblique counterparts, marked 半 in the book): their characters count in
both sections. Entering-tone (入声) groups form sections 15-19 of their own.
"""

from __future__ import annotations

from functools import lru_cache

from lingmao.verse import pingshui
from lingmao.verse.pingshui import Group

# Section number -> the full names (pingshui.Group.full_name) of the Pingshui groups it covers.
SECTIONS: dict[int, tuple[str, ...]] = {
    1: ("上平一东", "上平二冬", "上声一董", "上声二肿", "去声一送", "去声二宋"),
    2: ("上平三江", "下平七阳", "上声三讲", "上声二十二养", "去声三绛", "去声二十三漾"),
    3: ("上平四支", "上平五微", "上平八齐", "上平十灰", "上声四纸", "上声五尾", "上声八荠", "上声十贿",
        "去声四寘", "去声五未", "去声八霁", "去声九泰", "去声十一队"),
    4: ("上平六鱼", "上平七虞", "上声六语", "上声七麌", "去声六御", "去声七遇"),
    5: ("上平九佳", "上平十灰", "上声九蟹", "上声十贿", "去声九泰", "去声十卦", "去声十一队"),
    6: ("上平十一真", "上平十二文", "上平十三元", "上声十一轸", "上声十二吻", "上声十三阮",
        "去声十二震", "去声十三问", "去声十四愿"),
    7: ("上平十三元", "上平十四寒", "上平十五删", "下平一先", "上声十三阮", "上声十四旱", "上声十五潸",
        "上声十六铣", "去声十四愿", "去声十五翰", "去声十六谏", "去声十七霰"),
    8: ("下平二萧", "下平三肴", "下平四豪", "上声十七筿", "上声十八巧", "上声十九皓", "去声十八啸", "去声十九效",
        "去声二十号"),
    9: ("下平五歌", "上声二十哿", "去声二十一个"),
    10: ("上平九佳", "下平六麻", "上声二十一马", "去声十卦", "去声二十二祃"),
    11: ("下平八庚", "下平九青", "下平十蒸", "上声二十三梗", "上声二十四迥", "去声二十四敬", "去声二十五径"),
    12: ("下平十一尤", "上声二十五有", "去声二十六宥"),
    13: ("下平十二侵", "上声二十六寝", "去声二十七沁"),
    14: ("下平十三覃", "下平十四盐", "下平十五咸", "上声二十七感", "上声二十八琰", "上声二十九豏",
         "去声二十八勘", "去声二十九艳", "去声三十陷"),
    15: ("入声一屋", "入声二沃"),
    16: ("入声三觉", "入声十药"),
    17: ("入声四质", "入声十一陌", "入声十二锡", "入声十三职", "入声十四缉"),
    18: ("入声五物", "入声六月", "入声七曷", "入声八黠", "入声九屑", "入声十六叶"),
    19: ("入声十五合", "入声十七洽"),
}
SECTION_NUMBERS: tuple[int, ...] = tuple(SECTIONS)
_NUMERALS = "一二三四五六七八九十"


def section_name(number: int) -> str:
    """第一部 ... 第十九部."""
    tens, ones = divmod(number, 10)
    text = ("十" if tens == 1 else "") + (_NUMERALS[ones - 1] if ones else "")
    return f"第{text}部"


@lru_cache(maxsize=1)
def _sections_of_group() -> dict[int, tuple[int, ...]]:
    by_name = {g.full_name: g.index for g in pingshui.groups()}
    out: dict[int, list[int]] = {}
    for number, names in SECTIONS.items():
        for name in names:
            out.setdefault(by_name[name], []).append(number)  # KeyError = a name that is not a Pingshui group
    missing = [g.full_name for g in pingshui.groups() if g.index not in out]
    if missing:
        raise RuntimeError(f"Pingshui groups in no 词林正韵 section: {missing}")
    return {index: tuple(numbers) for index, numbers in out.items()}


def sections_of_group(group: Group) -> tuple[int, ...]:
    """The section number(s) a Pingshui group belongs to (two for the groups the book splits)."""
    return _sections_of_group()[group.index]


@lru_cache(maxsize=65536)
def readings(ch: str) -> frozenset[tuple[int, str]]:
    """(section, tone) pairs of `ch`: (1, 平) for 东, (15, 仄) for 屋, ...; empty when unknown."""
    return frozenset((s, g.tone) for g in pingshui.readings(ch) for s in sections_of_group(g))
