"""The Python side: the design's `train_model(...)` call, and the model standing alone without Lightning or Hydra."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

import lingmao
from lingmao import LingmaoError, load_model, train_model
from lingmao.api import PARAMETERS, design_overrides
from lingmao.config import compose_config, validate
from tests.conftest import run_module

ROOT = Path(__file__).resolve().parent.parent


def test_every_design_parameter_reaches_its_config_key(tmp_path):
    conf = validate(compose_config(design_overrides({
        "train_file": str(lingmao.__path__[0] + "/corpus/poetry_sample/train.jsonl"), "batch_size": 4,
        "learning_rate": 3e-5, "epochs": 5, "d_model": 64, "nhead": 8, "num_layers": 3, "dim_feedforward": 96,
        "dropout": 0.2, "context_length": 96, "use_amp": False, "accumulation_steps": 4, "night_mode": False,
        "weight_decay": 0.05, "max_grad_norm": 0.5, "warmup_steps": 7, "stride": 48, "checkpoint_every": 2,
        "auto_resume": False, "save_on_interrupt": False, "model_save_dir": str(tmp_path / "it's here"),
        "device": "cpu", "seed": 3, "run_name": "x",
    })))
    assert (conf.data.batch_size, conf.data.context_length, conf.data.stride) == (4, 96, 48)
    assert (conf.optim.lr, conf.optim.accumulation_steps, conf.optim.weight_decay) == (3e-5, 4, 0.05)
    assert (conf.optim.max_grad_norm, conf.optim.warmup_steps) == (0.5, 7)
    assert (conf.model.d_model, conf.model.nhead, conf.model.num_layers) == (64, 8, 3)
    assert (conf.model.dim_feedforward, conf.model.dropout) == (96, 0.2)
    assert (conf.trainer.max_epochs, conf.trainer.max_steps) == (5, -1)
    assert conf.hardware.precision == "32-true" and conf.hardware.accelerator == "cpu"
    assert conf.night.enabled is False and conf.auto_resume is False and conf.save_on_interrupt is False
    assert conf.model_save_dir == str(tmp_path / "it's here") and conf.checkpoint_every == 2 and conf.seed == 3


def test_a_wrong_keyword_is_one_line():
    with pytest.raises(LingmaoError) as info:
        train_model(train_file="x.jsonl", learning_rat=1e-3)
    message = str(info.value)
    assert "learning_rat: unknown parameter" in message and "did you mean learning_rate?" in message
    assert "\n" not in message
    with pytest.raises(LingmaoError, match="optim.lr='fast': wrong type"):
        train_model(overrides=["optim.lr=fast"])
    assert set(PARAMETERS) >= {"train_file", "test_file", "model_save_dir", "batch_size", "learning_rate", "epochs",
                               "d_model", "nhead", "num_layers", "context_length", "use_amp",
                               "accumulation_steps", "night_mode"}


def _design_call(small_corpus, tmp_path, **changed):
    train, test = small_corpus
    params = dict(
        train_file=str(train), test_file=str(test), model_save_dir=str(tmp_path / "model"),
        batch_size=8, learning_rate=3e-4, epochs=1, d_model=32, nhead=2, num_layers=1, context_length=32,
        use_amp=True, accumulation_steps=2, night_mode=True,
    )
    return train_model(
        overrides=[f"paths.output_dir={tmp_path / 'outputs'}", "night.now=12:00", "model.dim_feedforward=64",
                   "++trainer.limit_train_batches=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
                   "show_samples=false", "hardware.cpu_threads=1"],
        **{**params, **changed},
    )


@pytest.mark.slow
def test_the_design_example_trains_tests_and_exports(small_corpus, tmp_path):
    """The design document's call, scaled down to a tiny model and one short epoch."""
    result = _design_call(small_corpus, tmp_path)
    assert result.global_step == 3  # 6 batches, 2 accumulated per step
    assert result.best_val_loss is not None and result.test is not None and result.test.perplexity > 1
    assert result.export_dir == tmp_path / "model" and result.checkpoint.is_file()
    assert load_model(result.export_dir).config["model"]["d_model"] == 32


@pytest.mark.slow
def test_the_design_resume_example_continues_the_same_run(small_corpus, tmp_path):
    """The design's second use: the same call with more epochs continues from its checkpoint."""
    first = _design_call(small_corpus, tmp_path)
    again = _design_call(small_corpus, tmp_path, epochs=2)
    assert again.run_dir == first.run_dir  # epochs do not change which run this is
    assert again.global_step == 6
    assert torch.load(again.checkpoint, weights_only=True)["global_step"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("progress", [True, False])
def test_train_model_prints_the_command_lines_progress(small_corpus, tmp_path, capsys, progress):
    """The progress lines of the command line (no terminal here: one line every N steps), the validations and
    the summary; none of them with progress=False."""
    from tests.conftest import tiny_overrides

    train, test = small_corpus
    overrides = [*tiny_overrides(tmp_path, train, test, steps=4), "logger.progress_every_n_steps=2",
                 "trainer.val_check_interval=4", "export=false", "run_test=false"]
    overrides.remove("trainer.enable_progress_bar=false")
    train_model(overrides=overrides, progress=progress)
    err = capsys.readouterr().err
    lines = ["step 2/4 (50%) | epoch 0", "step 4/4 (100%) | epoch 0", "validation at step 4: loss ",
             "run summary"]
    if progress:
        assert all(line in err for line in lines), err[-3000:]
    else:
        assert not any(line in err for line in lines), err[-3000:]


BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("lightning", "pytorch_lightning", "hydra", "omegaconf", "torchmetrics"):
                raise ImportError(f"{name} is not installed here")
    sys.meta_path.insert(0, Blocked())
""")


@pytest.mark.slow
def test_the_model_stands_alone_without_lightning_or_hydra(tmp_path):
    from lingmao.data.tokenizer import train_tokenizer
    from lingmao.export import export_model
    from lingmao.model import ModelConfig, build_model

    tok = train_tokenizer(["床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"] * 3)
    cfg = ModelConfig(d_model=16, nhead=2, num_layers=1, dim_feedforward=32)
    export_model(tmp_path / "m", build_model(cfg, tok.get_vocab_size()), tok, cfg, {"context_length": 32})
    script = BLOCKER + textwrap.dedent(f"""
        import lingmao.model
        import lingmao
        lm = lingmao.load_model({str(tmp_path / "m")!r})
        print(lm.generate("", form="wujue", seed=1, rhyme="none", tones="off")[0])
        blocked = [m for m in sys.modules if m.split(".")[0] in ("lightning", "hydra", "omegaconf")]
        print("loaded:", blocked)
    """)
    proc = run_module("-c", script, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "loaded: []"
    assert len(lines[0]) == len("床前明月光，疑是地上霜。")
