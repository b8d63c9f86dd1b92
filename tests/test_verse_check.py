"""The checker on texts, plain-text files and JSONL; form detection; ci verdicts; the `lingmao.check` app."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from lingmao.check import run
from lingmao.cli import quote_unicode_overrides
from lingmao.config import CONF_DIR
from lingmao.errors import LingmaoError
from lingmao.verse.checker import Summary, check
from lingmao.verse.notation import tone_marks
from lingmao.verse.shape import clauses, shape
from lingmao.verse.tunes import find_tune, tune_named, tunes
from tests.conftest import SAMPLE, run_module

DENGGAO = ("風急天高猿嘯哀，渚清沙白鳥飛回。\n無邊落木蕭蕭下，不盡長江滾滾來。\n"
           "萬里悲秋常作客，百年多病獨登臺。\n艱難苦恨繁霜鬢，潦倒新停濁酒杯。")
JINGYESI = "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"  # 古绝: rhymes, but not in a tonal pattern
HUANXISHA = "一曲新词酒一杯，去年天气旧亭台。\n夕阳西下几时回。\n无可奈何花落去，似曾相识燕归来。\n小园香径独徘徊。"


def cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("check", overrides=quote_unicode_overrides(list(overrides)))


def test_shapes_and_clauses():
    parts = clauses("夜短更难留远梦，日高何计学行云。\n\n树深莺过静无人？")
    assert [c.text for c in parts] == ["夜短更难留远梦", "日高何计学行云", "树深莺过静无人"]
    assert shape(parts) == "7，7。7。"
    assert shape(clauses("春眠不覺曉\n處處聞啼鳥")) == "55"


def test_tunes_table():
    table = tunes()
    assert len(table) >= 50 and len({t.name for t in table}) == len(table)
    assert [t.name for t in table[:4]] == ["浣溪沙", "水调歌头", "鹧鸪天", "菩萨蛮"]
    huanxisha = tune_named("浣溪沙")
    assert huanxisha.shape == "7。7。7。|7，7。7。" and huanxisha.stanza == 3 and huanxisha.characters == 42
    assert huanxisha.rhymes == (((0, "平"), (1, "平"), (2, "平"), (4, "平"), (5, "平")),)
    assert tune_named("浣溪沙") is tune_named("浣溪紗")  # traditional characters too
    assert find_tune("望江南") is tune_named("忆江南") and find_tune("酹江月・念奴娇") is tune_named("念奴娇")
    assert tune_named("如梦令").stanza is None  # one stanza
    with pytest.raises(LingmaoError, match="list_tunes=true"):
        tune_named("无此调")


def test_detection_and_ci_verdicts():
    assert check(DENGGAO).form == "qilv" and check(JINGYESI).form == "wujue"
    verdict = check(HUANXISHA, title="浣溪沙")
    assert (verdict.form, verdict.tune, verdict.detected) == ("ci", "浣溪沙", True)
    assert check(HUANXISHA).form is None  # six lines of seven: as likely an old-style shi
    rumengling = check("常记溪亭日暮。沉醉不知归路。兴尽晚回舟，误入藕花深处。争渡。争渡。惊起一滩鸥鹭。")
    assert (rumengling.form, rumengling.tune) == ("ci", "如梦令") and rumengling.rhyme_ok
    assert verdict.format_ok and verdict.rhyme_ok and verdict.rhyme_class == ["第三部"]  # 杯 台 回 来 徊: 灰/咍
    assert verdict.tones_lenient is None  # ci have no tone pattern here
    # A 生查子 has the shape of a 五律: the title decides.
    shengchazi = ("含羞整翠鬟，得意频相顾。\n雁柱十三弦，一一春莺语。\n"
                  "娇云容易飞，梦断知何处。\n深院锁黄昏，阵阵芭蕉雨。")
    assert check(shengchazi).form == "wulv"
    ci = check(shengchazi, title="生查子")
    assert ci.tune == "生查子" and ci.rhyme_ok  # 顾 语 处 雨: 仄 rhymes of 第四部
    wrong = check(HUANXISHA.replace("夕阳西下几时回", "夕阳西下几时"), tune="浣溪沙")
    assert not wrong.format_ok and "clause 3" in wrong.format_problems[0]
    unrhymed = check(HUANXISHA.replace("独徘徊", "独徘步"), tune="浣溪沙")
    assert unrhymed.format_ok and not unrhymed.rhyme_ok and "clause 6" in unrhymed.rhyme_problems[0]
    assert check("春夏秋冬").form is None and check("春夏秋冬").format_ok is None


def test_jingyesi_is_not_regulated_and_says_why():
    verdict = check(JINGYESI)
    assert verdict.rhyme_ok and not verdict.tones_lenient and not verdict.rhythm_ok
    assert any("失粘" in str(v) for v in verdict.violations)


def test_tone_marks():
    marks = tone_marks(check(DENGGAO)).splitlines()
    assert marks[0] == DENGGAO.splitlines()[0]
    assert marks[1] == "○●○○○●○，●○○●●○◐。  十灰"  # 回 is 平 (十灰) and 仄 (队)
    assert tone_marks(check(HUANXISHA, tune="浣溪沙")).splitlines()[1].endswith("  第三部")


def test_summary_rates():
    summary = Summary()
    for poem, title in ((DENGGAO, None), (JINGYESI, None), (HUANXISHA, "浣溪沙"), ("春夏秋冬", None)):
        summary.add(check(poem, title=title))
    rates = summary.rates()
    assert summary.poems == 4 and rates["format"] == 1.0  # 3 poems with a form, all well-formed
    assert rates["tones lenient"] == 0.5 and rates["rhyme"] == 1.0  # 2 shi: 登高 yes, 静夜思 no
    assert summary.rates("七律")["tones lenient"] == 1.0
    assert "对粘" in summary.report()


def test_check_app_on_jsonl_and_text(tmp_path, capsys):
    records = [json.loads(line) for line in (SAMPLE / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    path = tmp_path / "poems.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records[:80]) + "\n", encoding="utf-8")
    tang = sum(r["source"] == "quantangshi" for r in records[:80])
    out = tmp_path / "verdicts.json"
    result = run(cfg(f"file={path}", "source=quantangshi", "details=false", f"output={out}"))
    assert result["summary"]["poems"] == tang
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["summary"] == result["summary"] and len(saved["poems"]) == tang
    assert saved["poems"][0]["where"] == f"{path}:1"
    printed = capsys.readouterr().out
    assert f"{tang} poems" in printed and "tones lenient" in printed
    named = tmp_path / "唐诗.jsonl"  # a Chinese name: the list arrives quoted, as one string
    named.write_bytes(path.read_bytes())
    twice = run(cfg(f"file=[{path},{named}]", "source=quantangshi", "details=false"))
    assert twice["summary"]["poems"] == 2 * tang
    with pytest.raises(LingmaoError, match="exists"):
        run(cfg(f"file={path}", f"output={out}"))  # never overwrites a file
    text = tmp_path / "poems.txt"
    text.write_text(f"{DENGGAO}\n---\n○●○ a tone-mark line is skipped\n{JINGYESI}\n", encoding="utf-8")
    both = run(cfg(f"file={text}", "details=true"))
    assert both["summary"]["poems"] == 2
    assert "liberties (strict only): line 1, char 1" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text('{"text": "春"}\n{oops\n', encoding="utf-8")
    with pytest.raises(LingmaoError, match=r"bad.jsonl:2: invalid JSON"):
        run(cfg(f"file={tmp_path / 'bad.jsonl'}"))
    with pytest.raises(LingmaoError, match="exactly one of text"):
        run(cfg())
    with pytest.raises(LingmaoError, match="form: 'sonnet'"):
        run(cfg("text=春", "form=sonnet"))


@pytest.mark.slow
def test_check_cli(tmp_path):
    """`python -m lingmao.check` as the shell runs it, Chinese values unquoted."""
    proc = run_module("lingmao.check", f"text={DENGGAO}", "form=七律", cwd=tmp_path, timeout=180,
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "七律 (qilv), 仄起首句入韵" in proc.stdout and "tones lenient ok, strict FAIL" in proc.stdout


@pytest.mark.slow
def test_the_verse_package_needs_neither_lightning_nor_hydra():
    modules = ", ".join(f"lingmao.verse.{m}" for m in ("checker", "forms", "notation", "tunes", "vocab", "meter",
                                                         "lines", "originality"))
    code = f"import sys, {modules}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'lightning', 'hydra'}}))"
    proc = run_module("-c", code, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_repeated_rhymes_and_characters():
    """重韵: one character ending two rhyming lines; 重字: a character used in two places, 叠字 being one use."""
    denggao = check(DENGGAO)
    assert denggao.distinct_rhymes and denggao.distinct_chars  # 蕭蕭 and 滾滾 are 叠字, not 重字
    assert "no 重韵 ok, no 重字 ok" in denggao.report()
    jingyesi = check(JINGYESI)
    assert jingyesi.distinct_rhymes and not jingyesi.distinct_chars
    assert [str(r) for r in jingyesi.repeated_chars] == [
        "'明' at line 1, char 3 and line 3, char 4", "'月' at line 1, char 4 and line 3, char 5",
        "'頭' at line 3, char 2 and line 4, char 2"]
    # 流 ends lines 2 and 4 (both rhyme), and in simplified and traditional form 楼 and 樓 are one character.
    repeated = check("白日依山尽，黄河入海流。\n欲穷千里目，更上一层流。")
    assert not repeated.distinct_rhymes and repeated.rhyme_ok  # the rhyme itself is fine
    assert [str(r) for r in repeated.repeated_rhymes] == ["'流' ends lines 2 and 4"]
    assert "重韵: '流' ends lines 2 and 4" in repeated.report()
    mixed = check("樓上依山尽，黄河入海流。\n欲穷千里目，更上一层楼。")
    assert mixed.distinct_rhymes and [str(r) for r in mixed.repeated_chars] == [
        "'樓' at line 1, char 1 and line 4, char 5", "'上' at line 1, char 2 and line 4, char 2"]
    # A run of one character is one use however long; two runs are two uses.
    assert check("青青河畔草，郁郁园中柳。\n盈盈楼上女，皎皎当窗牖。").distinct_chars
    assert [str(r) for r in check("青青河畔草，郁郁园中青。\n盈盈楼上女，皎皎当窗牖。").repeated_chars] == [
        "'青' at line 1, char 1, line 1, char 2 and line 2, char 5"]
    assert check(HUANXISHA, tune="浣溪沙").distinct_chars is None  # ci are not judged for repeats
    assert check(JINGYESI, rhyme_mode="none").distinct_rhymes is None
    summary = Summary()
    for poem in (DENGGAO, JINGYESI, "白日依山尽，黄河入海流。\n欲穷千里目，更上一层流。"):
        summary.add(check(poem))
    assert summary.rates()["no 重韵"] == pytest.approx(2 / 3) and summary.rates()["no 重字"] == pytest.approx(1 / 3)


def test_page_marks_show_repeats():
    from lingmao.serve.marks import poem_marks

    marks = poem_marks("白日依山尽，黄河入海流。\n欲穷千里目，更上一层流。")
    cells = {(i, j): c for i, line in enumerate(marks["lines"]) for j, c in enumerate(line)}
    assert cells[(0, 10)]["ch"] == "流" and cells[(0, 10)]["repeat"] == "重韵"
    assert cells[(1, 10)]["repeat"] == "重韵" and cells[(0, 0)]["repeat"] is None
    assert "重韵: '流' ends lines 2 and 4" in marks["verdict"]["problems"]
    jingyesi = poem_marks(JINGYESI)
    repeats = [c["ch"] for line in jingyesi["lines"] for c in line if c["repeat"] == "重字"]
    assert repeats == list("明月頭明月頭")  # in text order
    assert all(c["repeat"] is None for line in poem_marks(DENGGAO)["lines"] for c in line)
