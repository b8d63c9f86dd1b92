"""Generation: sampling options, verse forms, acrostics, rhyme, the Python API and the CLI."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from pypinyin import Style, pinyin

from lingmao import LingmaoError, load_model
from lingmao.export import LingmaoModel
from lingmao.verse.checker import check
from lingmao.verse.forms import FORMS
from lingmao.verse.han import is_han
from lingmao.verse.modern import RHYME_CLASSES, rhyme_class
from tests.conftest import FORMS_FAST_FIRST, run_module, tiny_export

ACROSTIC = "春夏秋冬風花雪月"


def independent_layout_check(text: str, form: str) -> None:
    """The layout, checked without lingmao.verse: line1，line2。\\nline3，line4。..."""
    chars, lines = FORMS[form]
    line = f"[\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U000323af]{{{chars}}}"
    couplet = f"{line}，{line}。"
    assert re.fullmatch("\n".join([couplet] * (lines // 2)), text), text


@pytest.mark.parametrize("form", FORMS_FAST_FIRST)
def test_forms_are_always_well_formed(lm, form):
    poems = lm.generate("", form=form, num_samples=100, seed=0, temperature=1.0, top_p=1.0)
    assert len(poems) == 100
    for poem in poems:
        assert check(poem, form).format_ok
        independent_layout_check(poem, form)


@pytest.mark.parametrize("form", FORMS_FAST_FIRST)
def test_acrostic_and_modern_rhyme(lm, form):
    chars, lines = FORMS[form]
    acrostic = ACROSTIC[:lines]
    assert all(lm.tokenizer.token_to_id(ch) is not None for ch in acrostic)
    poems = lm.generate("", form=form, acrostic=acrostic, rhyme="modern", tones="off", num_samples=100, seed=1)
    for poem in poems:
        verdict = check(poem, form, acrostic=acrostic, rhyme_mode="modern")
        assert verdict.format_ok and verdict.rhyme_ok, verdict.report()
        independent_layout_check(poem, form)
        verse = re.split("[，。\n]+", poem.rstrip("。"))
        assert [v[0] for v in verse] == list(acrostic)
        ends = [verse[i][-1] for i in range(1, lines, 2)]
        group = rhyme_class(ends[0])
        assert group is not None
        for ch in ends:  # independent of the grouping code: pypinyin's own final of each rhyme character
            final = pinyin(ch, style=Style.FINALS, strict=True)[0][0]
            assert final in RHYME_CLASSES[group], (poem, ch, final)


def test_rhyme_classes():
    assert rhyme_class("光") == rhyme_class("江") == rhyme_class("黄") == "ang"
    assert rhyme_class("家") != rhyme_class("光")
    assert rhyme_class("，") is None and not is_han("，") and is_han("㐀")


def test_prompt_starts_the_poem(lm):
    prompt = "秦川雄帝宅，函谷"
    for poem in lm.generate(prompt, form="wujue", num_samples=5, seed=2):
        assert poem.startswith(prompt) and check(poem, "wujue").format_ok
    assert check(lm.generate("秦川雄帝宅", form="五律", seed=3)[0], "wulv").format_ok
    with pytest.raises(LingmaoError, match="does not fit"):
        lm.generate("秦川雄帝宅宅", form="wujue")
    with pytest.raises(LingmaoError, match="acrostic wants"):
        lm.generate("秦川", form="wujue", acrostic="春")


def test_form_errors(lm, tmp_path):
    with pytest.raises(LingmaoError, match="only 4 lines"):
        lm.generate(form="wujue", acrostic="春夏秋冬風")
    missing = next(ch for ch in "龘靐齉爩鱻" if lm.tokenizer.token_to_id(ch) is None)
    with pytest.raises(LingmaoError, match=missing):
        lm.generate(form="qijue", acrostic=f"春{missing}")
    with pytest.raises(LingmaoError, match="needs a verse form"):
        lm.generate(acrostic="春")
    with pytest.raises(LingmaoError, match="form: 'sonnet'"):
        lm.generate(form="sonnet")
    with pytest.raises(LingmaoError, match="temperature"):
        lm.generate(temperature=-1)
    bare = load_model(tiny_export(tmp_path / "bare", texts=["春夏秋冬", "風花雪月"]))
    with pytest.raises(LingmaoError, match="no '，'"):
        bare.generate(form="wujue")


def test_greedy_seed_and_top_k(lm):
    greedy = lm.generate("秦川", max_new_tokens=30, temperature=0, num_samples=3)
    assert greedy[0] == greedy[1] == greedy[2]
    assert lm.generate("秦川", max_new_tokens=30, temperature=0, seed=5) == greedy[:1]
    assert lm.generate("秦川", max_new_tokens=30, top_k=1, seed=9) == greedy[:1]
    same = lm.generate("秦川", max_new_tokens=30, temperature=1.0, seed=7, num_samples=2)
    assert same == lm.generate("秦川", max_new_tokens=30, temperature=1.0, seed=7, num_samples=2)
    others = {lm.generate("秦川", max_new_tokens=30, temperature=1.0, seed=s)[0] for s in range(4)}
    assert len(others) > 1
    assert all(t.startswith("秦川") for t in others | set(same))
    # The form's greedy poem is deterministic too.
    assert lm.generate(form="wujue", temperature=0) == lm.generate(form="wujue", top_k=1, seed=3)


def test_stream_and_context_crop(lm):
    pieces: list[str] = []
    text = lm.generate("秦", max_new_tokens=150, temperature=0, stream=pieces.append, context_length=16)
    assert text[0] == "秦" + "".join(pieces)
    assert len(text[0]) <= 151  # longer than the context: the left was cropped, no error


def test_convert_and_title(tmp_path, caplog):
    # A model trained on traditional text accepts simplified input when its config says s2t.
    lm = load_model(tiny_export(tmp_path / "s2t", convert="s2t"))
    poem = lm.generate(form="wujue", acrostic="东风", seed=0)[0]
    assert poem[0] == "東" and poem.split("，")[1].startswith("風")
    with caplog.at_level(logging.WARNING):
        lm.generate("秦", title="帝京篇", max_new_tokens=3, seed=0)
    assert "not trained with titles" in caplog.text

    from lingmao.sampling import _title_prefix

    titled = load_model(tiny_export(tmp_path / "titled", template="{title}\n{text}"))
    ids = _title_prefix(titled.tokenizer, "帝京", "{title}\n{text}", lambda s: s)
    assert titled.tokenizer.decode(ids) == "帝京\n"
    assert check(titled.generate(form="wujue", title="帝京", seed=0)[0], "wujue").format_ok


def test_from_checkpoint(lm, model_dir, tmp_path):
    from lingmao.module import LingmaoLM

    module = LingmaoLM(model=dict(lm.config["model"]), optim={}, vocab_size=lm.model.vocab_size, pad_id=0)
    module.model.load_state_dict(lm.model.state_dict())
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    with pytest.raises(LingmaoError, match="tokenizer"):
        LingmaoModel.from_checkpoint(ckpt)
    (run_dir / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    loaded = LingmaoModel.from_checkpoint(ckpt)
    kwargs = dict(max_new_tokens=20, temperature=0, context_length=64)
    assert loaded.generate("秦川", **kwargs) == lm.generate("秦川", **kwargs)
    assert loaded.config["data"] == {} and "condition" not in loaded.config

    # A run that has exported nothing yet: its data settings and header come from the config its checkpoint
    # records, so that evaluate ckpt=... reads the texts as the run trained on them.
    recorded = {"data.convert": "t2s", "data.context_length": 64, "data.condition": ["title", "author"],
                "data.condition_dropout": 0.0, "model.d_model": 32}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "lingmao": {"config": recorded}}, ckpt)
    loaded = LingmaoModel.from_checkpoint(ckpt)
    assert loaded.config["data"] == {"convert": "t2s", "context_length": 64}
    assert loaded.config["condition"] == {"fields": ["title", "author"], "keywords": 3, "dropout": 0.0}


@pytest.mark.slow
def test_cli(model_dir, tmp_path):
    ok = run_module("lingmao.generate", f"model_dir={model_dir}", "prompt=秦川雄帝宅", "max_new_tokens=10", "seed=1",
                 cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("秦川雄帝宅") and 5 < len(ok.stdout.strip()) <= 15
    bad = run_module("lingmao.generate", "prompt=秦川", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
    assert "model_dir" in bad.stderr
