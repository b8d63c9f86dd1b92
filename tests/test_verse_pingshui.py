"""The Pingshui table, simplified input through OpenCC, the 词林正韵 sections and the modern classes.

Expectations come from rhyme books (平水韵 group lists), not from the code under test.
"""

from __future__ import annotations

import pytest

from lingmao.verse import cilin, modern, pingshui, rhyme
from lingmao.verse.pingshui import PING, ZE


def test_the_table_has_the_106_groups_of_the_books():
    groups = pingshui.groups()
    assert len(groups) == 106
    by_section = {}
    for g in groups:
        by_section.setdefault(g.section, []).append(g)
    assert {s: len(gs) for s, gs in by_section.items()} == {"上平": 15, "下平": 15, "上声": 29, "去声": 30, "入声": 17}
    assert all(g.tone == PING for g in by_section["上平"] + by_section["下平"])
    assert all(g.tone == ZE for s in ("上声", "去声", "入声") for g in by_section[s])
    assert [g.name for g in by_section["上平"][:4]] == ["一东", "二冬", "三江", "四支"]
    assert [g.name for g in by_section["下平"][:3]] == ["一先", "二萧", "三肴"]
    assert pingshui.group_named("下平聲一先").full_name == "下平一先"


@pytest.mark.parametrize(
    "ch, group",
    [
        # Entering-tone characters: level or rising in Mandarin, oblique (入声) in the rhyme books.
        ("白", "入声十一陌"), ("國", "入声十三职"), ("国", "入声十三职"), ("十", "入声十四缉"), ("一", "入声四质"),
        ("竹", "入声一屋"), ("月", "入声六月"), ("出", "入声四质"), ("黑", "入声十三职"), ("石", "入声十一陌"),
    ],
)
def test_entering_tone_characters_are_oblique(ch, group):
    assert pingshui.tones(ch) == {ZE}
    assert group in {g.full_name for g in pingshui.readings(ch)}


@pytest.mark.parametrize(
    "ch, group",
    [
        ("東", "上平一东"), ("东", "上平一东"), ("風", "上平一东"), ("风", "上平一东"),
        ("斜", "下平六麻"),  # xié today, rhymes with 家 花 in the books
        ("飛", "上平五微"), ("家", "下平六麻"), ("山", "上平十五删"), ("天", "下平一先"), ("流", "下平十一尤"),
    ],
)
def test_level_tone_groups(ch, group):
    assert pingshui.tones(ch) == {PING}
    assert [g.full_name for g in pingshui.level_groups(ch)] == [group]


def test_polyphonic_characters_keep_every_reading():
    # 看 kān (寒) / kàn (翰); 思 sī (支) / sì (寘); 重 chóng (冬) / zhòng (肿, 宋); 中 zhōng / zhòng
    assert pingshui.tones("看") == pingshui.tones("思") == pingshui.tones("重") == {PING, ZE}
    assert {g.full_name for g in pingshui.readings("看")} == {"上平十四寒", "去声十五翰"}
    assert {"上平二冬", "上声二肿", "去声二宋"} <= {g.full_name for g in pingshui.readings("重")}
    assert pingshui.is_level("看") and pingshui.is_oblique("看")
    assert pingshui.tones("，") == pingshui.tones("A") == frozenset()


def test_simplified_characters_stand_for_their_traditional_forms():
    for simplified, traditional in [("东", "東"), ("为", "為"), ("过", "過"), ("发", "發"), ("乡", "鄉")]:
        assert traditional in pingshui.candidates(simplified)
        assert pingshui.readings(simplified) == pingshui.readings(traditional) or traditional in "發"
    # 干 stands for 干 乾 幹: level (寒, 先) and oblique (翰); traditional 乾 keeps only its own readings.
    assert {"干", "乾", "幹"} <= pingshui.candidates("干")
    assert pingshui.tones("干") == {PING, ZE}
    assert pingshui.tones("乾") == {PING}
    assert pingshui.candidates("乾") == {"乾"}


def test_cilin_sections_cover_every_group():
    numbers = {g.full_name: cilin.sections_of_group(g) for g in pingshui.groups()}
    assert all(numbers.values())
    # The groups the book splits between two sections, and only those.
    split = {name for name, n in numbers.items() if len(n) == 2}
    assert split == {"上平九佳", "上平十灰", "上平十三元", "上声十贿", "上声十三阮", "去声九泰", "去声十卦",
                     "去声十一队", "去声十四愿"}
    assert numbers["上平一东"] == numbers["上声一董"] == numbers["去声一送"] == (1,)
    assert numbers["入声一屋"] == (15,) and numbers["入声十七洽"] == (19,)
    assert cilin.readings("东") == {(1, PING)} and (1, ZE) in cilin.readings("动")
    assert cilin.section_name(11) == "第十一部"


def test_shared_class():
    assert rhyme.shared_class(list("天年元"), "pingshui", [PING] * 3).ok is False  # 元 is 十三元, not 一先
    verdict = rhyme.shared_class(list("天年先前"), "pingshui", [PING] * 4)
    assert verdict.ok and verdict.shared == "一先"
    miss = rhyme.shared_class(list("天年白"), "pingshui", [PING] * 3)
    assert miss.shared == "一先" and miss.misses == (2,)
    assert rhyme.shared_class(list("东冬"), "pingshui").ok is False
    assert rhyme.shared_class(list("东冬"), "cilin").ok  # one section of the 词林正韵


def test_modern_classes():
    assert modern.rhyme_class("光") == modern.rhyme_class("江") == modern.rhyme_class("黄") == "ang"
    assert modern.rhyme_class("天") == modern.rhyme_class("年") == modern.rhyme_class("元") == "an"
    assert modern.rhyme_class("居") == modern.rhyme_class("衣") == "i"
    assert modern.rhyme_class("家") != modern.rhyme_class("光")
    assert modern.rhyme_class("，") is None
