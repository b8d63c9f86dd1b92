"""Tonal patterns and the verdict on known poems: 登高 passes lenient checking and strict checking names exactly
its liberties; deliberate faults (孤平, 三平尾, 三仄尾, 失粘) are named at their position.

The patterns and liberties below are written out from 格律 books, not computed by the code under test.
"""

from __future__ import annotations

import json

import opencc
import pytest

from lingmao.verse import meter
from lingmao.verse.checker import check
from tests.conftest import SAMPLE

# 五言绝句, the four standard patterns (王力《诗词格律》).
WUJUE = {
    ("平起", False): ("平平平仄仄", "仄仄仄平平", "仄仄平平仄", "平平仄仄平"),
    ("平起", True): ("平平仄仄平", "仄仄仄平平", "仄仄平平仄", "平平仄仄平"),
    ("仄起", False): ("仄仄平平仄", "平平仄仄平", "平平平仄仄", "仄仄仄平平"),
    ("仄起", True): ("仄仄仄平平", "平平仄仄平", "平平平仄仄", "仄仄仄平平"),
}
QILV_PINGQI_RHYMED = ("平平仄仄仄平平", "仄仄平平仄仄平", "仄仄平平平仄仄", "平平仄仄仄平平",
                      "平平仄仄平平仄", "仄仄平平仄仄平", "仄仄平平平仄仄", "平平仄仄仄平平")
QIJUE_ZEQI_UNRHYMED = ("仄仄平平平仄仄", "平平仄仄仄平平", "平平仄仄平平仄", "仄仄平平仄仄平")

DENGGAO = """風急天高猿嘯哀，渚清沙白鳥飛回。
無邊落木蕭蕭下，不盡長江滾滾來。
萬里悲秋常作客，百年多病獨登臺。
艱難苦恨繁霜鬢，潦倒新停濁酒杯。"""
# 仄起首句入韵. Where 登高 leaves the strict pattern (line, char): 風 猿 (line 1: 仄仄平平仄仄平), 渚 沙 (line 2:
# 平平仄仄仄平平), 百 多 (line 6: 平平仄仄仄平平) -- all at free positions.
DENGGAO_LIBERTIES = {(1, 1), (1, 5), (2, 1), (2, 3), (6, 1), (6, 3)}
OTHER_REGULATED = [
    "國破山河在，城春草木深。\n感時花濺淚，恨別鳥驚心。\n烽火連三月，家書抵萬金。\n白頭搔更短，渾欲不勝簪。",  # 春望
    "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。",  # 登鸛雀樓
    "朝辭白帝彩雲間，千里江陵一日還。\n兩岸猿聲啼不住，輕舟已過萬重山。",  # 早發白帝城
    "相見時難別亦難，東風無力百花殘。\n春蠶到死絲方盡，蠟炬成灰淚始乾。\n"
    "曉鏡但愁雲鬢改，夜吟應覺月光寒。\n蓬山此去無多路，青鳥殷勤為探看。",  # 無題
]


def test_the_four_patterns_are_the_books():
    for p in meter.patterns(5, 4):
        assert p.tones == WUJUE[(p.start, p.first_rhymes)], p.name
    qilv = {(p.start, p.first_rhymes): p for p in meter.patterns(7, 8)}
    assert qilv[("平起", True)].tones == QILV_PINGQI_RHYMED
    assert qilv[("平起", True)].rhyme_lines == (0, 1, 3, 5, 7)
    qijue = {(p.start, p.first_rhymes): p for p in meter.patterns(7, 4)}
    assert qijue[("仄起", False)].tones == QIJUE_ZEQI_UNRHYMED
    assert qijue[("仄起", False)].rhyme_lines == (1, 3)
    # 对 and 粘 hold in every pattern: 2nd characters opposite within a couplet, equal across couplets.
    for chars, lines in ((5, 4), (7, 4), (5, 8), (7, 8)):
        for p in meter.patterns(chars, lines):
            second = [t[1] for t in p.tones]
            assert all(second[i] != second[i + 1] for i in range(0, lines, 2))
            assert all(second[i] == second[i + 1] for i in range(1, lines - 1, 2))


def test_denggao_passes_lenient_and_strict_names_its_liberties():
    verdict = check(DENGGAO)
    assert verdict.form == "qilv" and verdict.pattern == "仄起首句入韵"
    assert verdict.format_ok and verdict.rhyme_ok and verdict.rhyme_class == ["十灰"]
    assert verdict.tones_lenient and not verdict.tones_strict
    assert verdict.violations == []
    assert {(v.line, v.char) for v in verdict.liberties} == DENGGAO_LIBERTIES
    assert str(verdict.liberties[0]) == "line 1, char 1: 平 where 仄 is required"


@pytest.mark.parametrize("poem", OTHER_REGULATED)
def test_known_regulated_verse_passes_lenient(poem):
    verdict = check(poem)
    assert verdict.regulated, verdict.report()


def test_a_deliberate_lone_level_is_flagged_where_it_is():
    # 送友人 (first half), 平起首句入韵; line 4 is a B line, 平平仄仄平.
    poem = "青山橫北郭，白水繞東城。\n此地一為別，孤蓬萬里征。"
    assert check(poem).tones_lenient
    lone = poem.replace("孤蓬", "獨蓬")  # 獨蓬萬里征: 仄平仄仄平, the 平 of char 2 stands alone
    verdict = check(lone)
    faults = [(v.line, v.char, v.kind) for v in verdict.violations]
    assert faults == [(4, 1, "孤平")], verdict.report()
    assert str(verdict.violations[0]) == "line 4, char 1: 孤平: 仄 at chars 1 and 3 leave the 平 of char 2 alone"
    assert verdict.liberties == check(poem).liberties  # the fault is not counted as a liberty
    rescued = poem.replace("孤蓬萬", "獨蓬千")  # 仄平平仄平: the 3rd character rescues the line
    assert check(rescued).tones_lenient


def test_three_level_and_three_oblique_endings():
    base = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"  # line 4 is 仄仄仄平平 (D)
    tail = check(base.replace("一層樓", "高層樓"))  # 更上高層樓: 三平尾 at char 3
    assert [(v.line, v.char, v.kind) for v in tail.violations] == [(4, 3, "三平尾")]
    # 春望 line 3 感時花濺淚 is C (平平平仄仄); 感時淚濺淚 -> 仄仄仄 at the end: 三仄尾 at char 3
    poem = OTHER_REGULATED[0].replace("感時花濺淚", "感時淚濺淚")
    assert [(v.line, v.char, v.kind) for v in check(poem).violations] == [(3, 3, "三仄尾")]


def test_a_broken_link_between_couplets_is_named():
    broken = "白日依山盡，黃河入海流。\n欲上千里目，更上一層樓。"  # 上 仄 at line 3, char 2: 失粘 with line 2
    verdict = check(broken)
    assert not verdict.rhythm_ok
    assert any("失粘 with line 2" in str(v) and v.line == 3 and v.char == 2 for v in verdict.violations)


def _char_t2s():
    convert = opencc.OpenCC("t2s").convert
    return lambda text: "".join(convert(ch) for ch in text)


def test_simplified_and_traditional_give_the_same_verdicts():
    t2s = _char_t2s()
    for poem in [DENGGAO, *OTHER_REGULATED]:
        a, b = check(poem), check(t2s(poem))
        assert t2s(poem) != poem
        assert (a.form, a.pattern, a.rhyme_class, a.violations, a.liberties) == (
            b.form, b.pattern, b.rhyme_class, b.violations, b.liberties)


def test_simplified_verdicts_over_the_sample_never_stricter():
    """Over the bundled sample's Tang poems of the four shapes, converted character by character: the same
    verdict, except where a simplified character merges traditional ones of other tones or groups (干 乾 幹),
    which can only make the simplified text pass more."""
    t2s = _char_t2s()
    keys = ("format_ok", "rhyme_ok", "rhythm_ok", "tones_lenient", "tones_strict")
    same = looser = total = 0
    with open(SAMPLE / "test.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    for record in records:
        if record["source"] != "quantangshi":
            continue
        a = check(record["text"])
        if a.form is None or a.form == "ci":
            continue
        b = check(t2s(record["text"]))
        total += 1
        va, vb = [getattr(a, k) for k in keys], [getattr(b, k) for k in keys]
        if va == vb:
            same += 1
        else:
            assert all(bool(y) >= bool(x) for x, y in zip(va, vb, strict=True)), (record["text"], va, vb)
            looser += 1
    assert total > 200 and same / total >= 0.99, (same, looser, total)
