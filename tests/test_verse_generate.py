"""Verse by construction: constrained samples of a small trained model follow tones, rhymes and ci templates.

The model is trained for a few dozen steps (`verse_lm` in tests/conftest.py, built once per session). Each
verdict is confirmed by checks written independently of the decoding code: tones against the pattern strings,
rhymes through the Pingshui table, ci layouts from the tune table's JSON.
"""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch

from lingmao import LingmaoError, export_model
from lingmao.data.tokenizer import train_tokenizer
from lingmao.evaluate import distinct_n, evaluate_verse
from lingmao.export import LingmaoModel
from lingmao.model import ModelConfig, build_model
from lingmao.verse import cilin, meter, pingshui
from lingmao.verse.checker import check
from lingmao.verse.forms import FORMS, FormConstraint
from lingmao.verse.han import is_han
from lingmao.verse.pingshui import PING, ZE
from lingmao.verse.tunes import TUNES_FILE
from tests.conftest import FORMS_FAST_FIRST

TUNES = ["浣溪沙", "菩萨蛮", "西江月", "如梦令", "清平乐"]


@pytest.fixture(scope="module")
def lm(verse_lm) -> LingmaoModel:
    return verse_lm


def lines_of(poem: str) -> list[str]:
    return [x for x in re.split(r"[，。\n]+", poem) if x]


def fits(ch: str, tone: str) -> bool:
    return tone in pingshui.tones(ch)


def assert_follows_a_pattern(poem: str, form: str, mode: str) -> None:
    """Independent of the decoding code: some standard pattern fits at every position it fixes."""
    chars, n = FORMS[form]
    lines = lines_of(poem)
    assert len(lines) == n and all(len(x) == chars for x in lines), poem
    fitting = []
    for p in meter.patterns(chars, n):
        ok = True
        for line, tones, line_type in zip(lines, p.tones, p.types, strict=True):
            core = chars - 5
            fixed = range(chars) if mode == "strict" else [i for i in range(chars) if i % 2 == 1 or i == chars - 1]
            ok &= all(fits(line[i], tones[i]) for i in fixed)
            if mode == "lenient":
                ok &= not (line_type == "D" and not fits(line[core + 2], ZE))  # 三平尾
                ok &= not (line_type == "C" and not fits(line[core + 2], PING))  # 三仄尾
                ok &= not (line_type == "B" and not fits(line[core], PING) and not fits(line[core + 2], PING))
        if ok:
            fitting.append(p)
    assert fitting, poem
    # Rhyme: the rhyming line ends share a level-tone group, for one of the fitting patterns.
    assert any(
        set.intersection(*[{g.name for g in pingshui.level_groups(lines[i][-1])} for i in p.rhyme_lines])
        for p in fitting
    ), poem


@pytest.mark.parametrize("form", FORMS_FAST_FIRST)
def test_strict_samples_score_100_percent(lm, form):
    poems = lm.generate(form=form, tones="strict", rhyme="pingshui", num_samples=100, seed=1, temperature=1.0,
                        top_p=1.0)
    assert len(poems) == 100
    for poem in poems:
        verdict = check(poem, form)
        assert verdict.format_ok and verdict.rhyme_ok and verdict.tones_strict, verdict.report()
        assert_follows_a_pattern(poem, form, "strict")
    # Each sample settles its own pattern and rhyme group.
    verdicts = [check(poem, form) for poem in poems]
    assert len({v.pattern for v in verdicts}) > 1 and len({v.rhyme_class[0] for v in verdicts}) > 1


@pytest.mark.parametrize("form", FORMS_FAST_FIRST)
def test_lenient_samples_pass_lenient_checking(lm, form):
    poems = lm.generate(form=form, num_samples=50, seed=2, temperature=1.0, top_p=1.0)  # the defaults
    for poem in poems:
        verdict = check(poem, form)
        assert verdict.format_ok and verdict.rhyme_ok and verdict.tones_lenient, verdict.report()
        assert_follows_a_pattern(poem, form, "lenient")
    assert any(not check(p, form).tones_strict for p in poems)  # lenient does use its freedom


def rhyme_ends(poem: str) -> list[str]:
    """The ends of line 1 and the even lines, in simplified form (華 and 华 are one character)."""
    lines = lines_of(poem)
    return [pingshui.simplified(x[-1]) for x in [lines[0], *lines[1::2]]]


@pytest.mark.slow
def test_no_repeated_rhyme_in_100_samples_of_each_form(lm):
    """重韵: by construction no character ends two lines that may rhyme; without the rule the model repeats."""
    repeats = 0
    for form in FORMS:
        for poem in lm.generate(form=form, num_samples=100, seed=9, temperature=1.0, top_p=1.0):  # defaults
            ends = rhyme_ends(poem)
            assert len(set(ends)) == len(ends), poem
            verdict = check(poem, form)
            assert verdict.distinct_rhymes and verdict.rhyme_ok and verdict.tones_lenient, verdict.report()
        free = lm.generate(form=form, num_samples=40, seed=9, temperature=1.0, top_p=1.0, distinct_rhymes=False)
        repeats += sum(len(set(rhyme_ends(p))) < len(rhyme_ends(p)) for p in free)
    assert repeats > 10  # the tiny model rhymes 花 with 花 (or 華) when it may
    for poem in lm.generate(form="qilv", tones="off", rhyme="modern", num_samples=20, seed=9):
        assert len(set(rhyme_ends(poem))) == 5, poem


def test_too_few_rhymes_for_distinct_line_ends_is_an_error_before_sampling():
    """A vocabulary whose only 平 characters are 東 風 风 (一东): two characters, three tokens. A 五绝's line 1 and
    lines 2 and 4 need three different ones."""
    oblique = "白日入海月落竹石國十一出黑木葉雪客夜"
    texts = [oblique[k : k + 5] + "，" + oblique[k + 5 : k + 9] + "東。\n" for k in range(8)] + ["風风"]
    tok = train_tokenizer(texts)
    assert {t for t in tok.get_vocab() if is_han(t) and PING in pingshui.tones(t)} == set("東風风")
    model = build_model(ModelConfig(d_model=16, nhead=2, num_layers=1, dim_feedforward=32), tok.get_vocab_size())
    bare = LingmaoModel(model.eval(), tok, {})
    with pytest.raises(LingmaoError, match="no 平声 Pingshui group has 3 different characters in the model's "
                                           r"vocabulary for each of its rhyme positions \(no 重韵"):
        bare.generate(form="wujue", tones="off")
    verdicts = [check(p, "wujue") for p in bare.generate(form="wujue", tones="off", distinct_rhymes=False,
                                                          num_samples=20, seed=0)]
    assert all(v.rhyme_ok for v in verdicts) and not all(v.distinct_rhymes for v in verdicts)


def test_pattern_and_first_line_rhyme_are_obeyed(lm):
    for start, first in (("平起", True), ("仄起", False)):
        poems = lm.generate(form="wulv", tones="strict", pattern=start, first_line_rhymes=first, num_samples=20,
                            seed=3)
        for poem in poems:
            lines = lines_of(poem)
            assert fits(lines[0][1], start[0])
            assert fits(lines[0][-1], PING if first else ZE)
            wanted = next(p for p in meter.patterns(5, 8) if (p.start, p.first_rhymes) == (start, first))
            assert meter.tone_violations(lines, wanted, "strict") == [], poem
            if first:
                assert {g.name for g in pingshui.level_groups(lines[0][-1])} & set(check(poem, "wulv").rhyme_class)


def tune_regex(name: str) -> str:
    """The layout of a tune, built from the JSON table: clauses, a break after each stop, a blank line at |."""
    entry = next(t for t in json.loads(TUNES_FILE.read_text(encoding="utf-8"))["tunes"] if t["name"] == name)
    han = "[\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U000323af]"
    out = ""
    for n, mark, bar in re.findall(r"(\d+)([，。])(\|?)", entry["shape"]):
        out += f"{han}{{{n}}}{mark}" + ("\n" if mark == "。" else "") + ("\n" if bar else "")
    return out.rstrip("\n")


@pytest.mark.parametrize("tune", TUNES)
def test_ci_samples_match_their_templates(lm, tune):
    entry = next(t for t in json.loads(TUNES_FILE.read_text(encoding="utf-8"))["tunes"] if t["name"] == tune)
    poems = lm.generate(form="ci", tune=tune, num_samples=20, seed=4, temperature=1.0)
    for poem in poems:
        assert re.fullmatch(tune_regex(tune), poem), poem
        clause_ends = [c[-1] for c in re.split(r"[，。]\n*", poem) if c]
        for members in entry["rhymes"]:
            sections = [
                {s for s, t in cilin.readings(clause_ends[i]) if not tone or t == tone} for i, tone in members
            ]
            assert set.intersection(*sections), (poem, members)
        verdict = check(poem, tune=tune)
        assert verdict.format_ok and verdict.rhyme_ok, verdict.report()


def test_acrostic_picks_a_pattern_it_fits_or_says_which_position_fails(lm):
    # 白 is 仄 and 天 平: line starts 仄 平 平 仄 fit only the 仄起 patterns of a strict 五绝.
    poems = lm.generate(form="wujue", acrostic="白天天白", tones="strict", num_samples=20, seed=5)
    for poem in poems:
        assert [x[0] for x in lines_of(poem)] == list("白天天白")
        assert check(poem, "wujue").pattern.startswith("仄起") and check(poem, "wujue").tones_strict
    with pytest.raises(LingmaoError, match="line 1, char 1: '白' is 仄 where 平 is required"):
        lm.generate(form="wujue", acrostic="白天天白", tones="strict", pattern="平起")
    with pytest.raises(LingmaoError, match="no way to write form=wujue tones=strict"):
        lm.generate(form="wujue", acrostic="白白白白", tones="strict")
    assert check(lm.generate(form="wujue", acrostic="白白白白", seed=6)[0], "wujue").tones_lenient


def test_prompts_are_checked_against_the_pattern(lm):
    prompt = "青山橫北郭，白水繞東城。\n此地一為別，"
    for poem in lm.generate(prompt, form="wujue", num_samples=10, seed=7):
        assert poem.startswith(prompt) and check(poem, "wujue").tones_lenient
    # 啼 is not in the Pingshui table: a character the user fixes gets the benefit of the doubt, as in the checker.
    assert pingshui.tones("啼") == frozenset()
    for poem in lm.generate("朝辭白帝彩雲間，千里江陵一日還。\n兩岸猿聲啼不住，", form="qijue", num_samples=5, seed=7):
        assert check(poem, "qijue").regulated
    with pytest.raises(LingmaoError, match="孤平"):
        lm.generate(prompt + "獨蓬萬里", form="wujue")  # 仄平仄仄: 孤平 whatever ends the line
    with pytest.raises(LingmaoError, match="no way to write form=wujue tones=strict"):
        lm.generate("床前明月光", form="wujue", tones="strict")  # 平平平仄平 fits no pattern strictly
    with pytest.raises(LingmaoError, match="rhyme"):
        lm.generate("白日依山盡，黃河入海流。\n欲窮千里目，更上一層", form="wujue", rhyme="pingshui", tones="off",
                    acrostic="", first_line_rhymes=True)  # 盡 cannot rhyme (仄) but line 1 must


def test_a_vocabulary_without_level_characters_is_an_error_before_sampling():
    oblique = "白日入海月落竹石國十一出黑木葉雪客夜"
    texts = ["".join(itertools.islice(itertools.cycle(oblique), k, k + 5)) + "，" + oblique[:5] + "。\n" for k in
             range(10)]
    tok = train_tokenizer(texts)
    assert all(pingshui.tones(t) == {ZE} for t in tok.get_vocab() if is_han(t))
    model = build_model(ModelConfig(d_model=16, nhead=2, num_layers=1, dim_feedforward=32), tok.get_vocab_size())
    bare = LingmaoModel(model.eval(), tok, {})
    with pytest.raises(LingmaoError, match="no character of the model's vocabulary is 平"):
        bare.generate(form="wujue", tones="lenient", rhyme="none")
    with pytest.raises(LingmaoError, match="rhyme: no 平声 Pingshui group has characters"):
        bare.generate(form="wujue", tones="off")
    poem = bare.generate(form="wujue", tones="off", rhyme="none", seed=0)[0]
    assert check(poem, "wujue").format_ok


@pytest.mark.parametrize("batch", [3, 40])
def test_a_form_admits_what_its_living_patterns_admit(lm, batch):
    """The patterns of a form are held together (one tensor each): at every character position the mask is the
    union of what each living pattern admits alone (`variant_allowed`, which enforce_keywords reads), less the
    line ends already used where 重韵 is ruled out; for a few rows (the rhyme table read row by row) and for many
    (one product)."""
    generator = torch.Generator().manual_seed(1)
    for form in ("wujue", "qilv"):
        c = FormConstraint(lm.tokenizer, form, rhyme="pingshui", tones="lenient")
        generated = torch.zeros(batch, 0, dtype=torch.long)
        for step in range(c.steps):
            allowed = c.mask(step, generated)
            k = c.char_index.get(c.start + step)
            if k is not None:
                union = torch.zeros_like(allowed)
                for vi in range(len(c.variants)):
                    union |= c._state.variant_allowed(vi, k)
                if k in c.distinct_at:
                    assert not (allowed & ~union).any() and (union & ~allowed).sum() <= batch * 8 * len(c.distinct_at)
                else:
                    assert torch.equal(allowed, union), (form, k)
            choice = torch.where(allowed, torch.rand(allowed.shape, generator=generator), -1.0).argmax(-1)
            generated = torch.cat([generated, choice.unsqueeze(1)], dim=1)


POLICIES = ("uniform", "oblique_first", "repeat_first")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lenient", "strict"])
def test_no_dead_end_whatever_is_chosen(lm, mode):
    """Walk the masks alone, uniformly or adversarially (always a 仄-only character when one is allowed, to
    provoke 孤平; or a character that ended an earlier line, to provoke 重韵): no position is ever left without an
    admissible character, and every walk passes the check."""
    tok = lm.tokenizer
    pieces = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    oblique_only = torch.tensor([is_han(p) and pingshui.tones(p) == {ZE} for p in pieces])
    first_of: dict[str, int] = {}  # one id per character in simplified form: 華 and 华 alike
    same = torch.tensor([first_of.setdefault(pingshui.simplified(p) if is_han(p) else p, i)
                         for i, p in enumerate(pieces)])
    generator = torch.Generator().manual_seed(0)
    for form, policy in itertools.product(FORMS, POLICIES):
        constraint = FormConstraint(tok, form, rhyme="pingshui", tones=mode)
        walks = 60
        generated = torch.zeros(walks, 0, dtype=torch.long)
        for step in range(constraint.steps):
            allowed = constraint.mask(step, generated)
            assert bool(allowed.any(-1).all()), (form, policy, step)
            if policy == "oblique_first":
                preferred = allowed & oblique_only
                allowed = torch.where(preferred.any(-1, keepdim=True), preferred, allowed)
            if policy == "repeat_first":  # the characters already written, in either script
                written = torch.zeros(allowed.shape, dtype=torch.bool).scatter_(1, same[generated], True)
                preferred = written[:, same] & allowed
                allowed = torch.where(preferred.any(-1, keepdim=True), preferred, allowed)
            # uniform among the chosen set: the largest of uniform draws
            choice = torch.where(allowed, torch.rand(allowed.shape, generator=generator), -1.0).argmax(-1)
            generated = torch.cat([generated, choice.unsqueeze(1)], dim=1)
        for row in generated.tolist():
            poem = "".join(pieces[i] for i in row[:-1])
            verdict = check(poem, form)
            assert verdict.rhyme_ok and (verdict.tones_strict if mode == "strict" else verdict.tones_lenient), (
                policy, verdict.report())
            assert verdict.distinct_rhymes and len(set(rhyme_ends(poem))) == len(rhyme_ends(poem)), poem


def test_modern_rhyme_with_tones(lm):
    from lingmao.verse.modern import rhyme_class

    for poem in lm.generate(form="qijue", rhyme="modern", tones="strict", num_samples=20, seed=8):
        verdict = check(poem, "qijue", rhyme_mode="modern")
        assert verdict.rhyme_ok and verdict.tones_strict, verdict.report()
        ends = [x[-1] for x in lines_of(poem)[1::2]]
        assert len({rhyme_class(ch) for ch in ends}) == 1


def test_option_errors(lm):
    with pytest.raises(LingmaoError, match="tones: 'loose'"):
        lm.generate(form="wujue", tones="loose")
    with pytest.raises(LingmaoError, match="rhyme: 'latin'"):
        lm.generate(form="wujue", rhyme="latin")
    with pytest.raises(LingmaoError, match="tones=strict: ci tunes"):
        lm.generate(tune="浣溪沙", tones="strict")
    with pytest.raises(LingmaoError, match="rhyme=pingshui needs a verse form"):
        lm.generate("秦", rhyme=True, max_new_tokens=2)
    with pytest.raises(LingmaoError, match="pattern=平起 needs"):
        lm.generate(form="wujue", tones="off", pattern="平起")
    with pytest.raises(LingmaoError, match="tune: '无此调'"):
        lm.generate(tune="无此调")
    with pytest.raises(LingmaoError, match="form=ci needs tune"):
        lm.generate(form="ci")
    assert lm.generate(form="wujue", rhyme=False, tones="off", seed=0)  # false = none, still accepted


def test_evaluate_verse(lm):
    free = evaluate_verse(lm, ["wujue", "浣溪沙"], 12, rhyme="none", tones="off", batch_size=8, seed=0)
    assert set(free) == {"wujue", "浣溪沙"} and free["wujue"]["samples"] == 12
    assert free["wujue"]["format"] == 1.0 and 0 <= free["wujue"]["rhyme"] < 1
    forced = evaluate_verse(lm, ["qilv"], 5, rhyme="pingshui", tones="strict", seed=0)["qilv"]
    assert forced["rhyme"] == forced["tones strict"] == forced["tones lenient"] == 1.0
    assert 0 < forced["distinct-2"] <= 1
    assert forced["no 重韵"] == 1.0 and forced["repeated chars per poem"] >= 0 and "copied lines" not in forced
    assert distinct_n(["春風春風，春風。"], 2) == pytest.approx(2 / 4)  # 春風 風春 春風 | 春風: 2 distinct of 4
    with pytest.raises(LingmaoError, match="verse.forms: 'sonnet'"):
        evaluate_verse(lm, ["sonnet"], 2)


def test_generate_app_shows_tones(lm, tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from lingmao.cli import quote_unicode_overrides
    from lingmao.config import CONF_DIR
    from lingmao.generate import run

    model_dir = export_model(tmp_path / "model", lm.model, lm.tokenizer, lm.model.config,
                             {"context_length": 24})
    overrides = [f"model_dir={model_dir}", "form=qijue", "tones=strict", "show_tones=true", "seed=1", "device=cpu"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("generate", overrides=quote_unicode_overrides(overrides))
    run(cfg)
    out = capsys.readouterr().out.splitlines()
    poem_lines = [x for x in out if re.fullmatch(r"\S{7}，\S{7}。", x)]
    assert len(poem_lines) == 2
    for line in poem_lines:
        marks = out[out.index(line) + 1]
        for ch, m in zip(line, marks, strict=False):
            want = {frozenset({PING}): "○", frozenset({ZE}): "●", frozenset({PING, ZE}): "◐"}.get(
                pingshui.tones(ch), ch if not is_han(ch) else "◌")
            assert m == want, (line, marks)
    group = out[out.index(poem_lines[1]) + 1].split()[-1]
    assert group in {g.name for g in pingshui.level_groups(poem_lines[1][-2])}
    assert out[-1].startswith("○ 平  ● 仄")
    # The evaluation app with verse samples only; a list with Chinese in it arrives as one quoted string.
    from lingmao.evaluate import run as evaluate

    overrides = [f"model_dir={model_dir}", "verse.samples=4", "verse.forms=[wujue,浣溪沙]", "device=cpu",
                 f"output={tmp_path / 'eval.json'}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=quote_unicode_overrides(overrides))
    results = evaluate(cfg)
    assert set(results["verse"]) == {"wujue", "浣溪沙"} and "loss" not in results
    assert json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["verse"]["wujue"]["samples"] == 4


def test_list_tunes():
    from lingmao.generate import list_tunes

    rows = list_tunes().splitlines()
    assert len(rows) > 50 and rows[0].startswith("浣溪沙\t42字\t双调")
    assert "7平。7平。7平。|7，7平。7平。" in rows[0]
    assert "7a仄。7a仄。5b平。5b平。|5c仄。5c仄。5d平。5d平。" in next(r for r in rows if r.startswith("菩萨蛮"))
