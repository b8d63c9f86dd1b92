"""Files a run writes never lose or expose the user's work: exports that keep other files and survive kill -9,
one last.ckpt that is always the newest, checkpoints that cannot run code, atomic writes with the user's umask,
metrics that stay under their own headers across resumes."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import signal
import stat
import time
from pathlib import Path

import pytest
import torch

from lingmao import export_model, load_model
from lingmao.checkpointing import TrainingInterrupted, load_checkpoint_file
from lingmao.config import compose_config
from lingmao.data.tokenizer import train_tokenizer
from lingmao.errors import LingmaoError
from lingmao.export import READY
from lingmao.model import ModelConfig, build_model
from lingmao.train import train as train_run
from tests.conftest import SignalAt, run_modules, tiny_overrides, train_with

ROOT = Path(__file__).resolve().parent.parent
CFG = ModelConfig(d_model=16, nhead=2, num_layers=1, dim_feedforward=32, dropout=0.0, max_len=64)


def tiny_parts(seed: int = 0):
    tok = train_tokenizer(["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"])
    torch.manual_seed(seed)
    return build_model(CFG, tok.get_vocab_size()), tok


# ----------------------------------------------------------------------------------------------
# Exports
# ----------------------------------------------------------------------------------------------
def test_a_second_export_keeps_the_users_files(tmp_path):
    target = tmp_path / "export"
    model, tok = tiny_parts(0)
    export_model(target, model, tok, CFG)
    (target / "notes.txt").write_text("my notes")
    (target / "samples").mkdir()
    (target / "samples" / "a.txt").write_text("a poem I liked")
    other, _ = tiny_parts(1)
    export_model(target, other, tok, CFG)
    assert (target / "notes.txt").read_text() == "my notes"
    assert (target / "samples" / "a.txt").read_text() == "a poem I liked"
    loaded = load_model(target)
    assert torch.equal(loaded.model.head.weight, other.head.weight)  # the new weights replaced the old
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "lingmao-export.json", "model.safetensors",
                                                         "notes.txt", "samples", "tokenizer.json"]


def test_the_api_refuses_a_folder_that_is_not_an_export(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    model, tok = tiny_parts()
    with pytest.raises(LingmaoError, match="not a lingmao export"):
        export_model(mine, model, tok, CFG)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("folder", ["hugging_face", "own_config"])
def test_a_folder_lingmao_did_not_export_is_refused_not_overwritten(tmp_path, folder):
    """Known by lingmao's marker file, not by file names: a Hugging Face model folder has the very names."""
    target = tmp_path / folder
    target.mkdir()
    if folder == "hugging_face":
        files = {"config.json": '{"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768}',
                 "model.safetensors": "weights of someone else's model", "tokenizer.json": '{"version": "1.0"}'}
    else:
        files = {"config.json": '{"vocab_size": 8000, "model": "my own", "notes": "years of work"}'}
    for name, text in files.items():
        (target / name).write_text(text)
    model, tok = tiny_parts()
    with pytest.raises(LingmaoError, match="not a lingmao export") as info:
        export_model(target, model, tok, CFG)
    assert "\n" not in str(info.value)
    assert {p.name: p.read_text() for p in target.iterdir()} == files


def _export_twice(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    tok = tiny_parts()[1]
    export_model(first, tiny_parts(0)[0], tok, CFG)
    export_model(second, tiny_parts(1)[0], tok, CFG)
    return first, second


@pytest.mark.parametrize("swapped", ["model.safetensors", "tokenizer.json", "config.json"])
def test_load_model_refuses_a_file_that_is_not_the_exported_one(tmp_path, swapped):
    """New weights beside an old config load silently when the shapes match: the checksums say otherwise."""
    first, second = _export_twice(tmp_path)
    if swapped == "tokenizer.json":
        (first / swapped).write_text((first / swapped).read_text().replace("床", "牀"))
    elif swapped == "config.json":
        (first / swapped).write_text((first / swapped).read_text().replace('"dropout": 0.0', '"dropout": 0.5'))
    else:
        (first / swapped).write_bytes((second / swapped).read_bytes())
    with pytest.raises(LingmaoError) as info:
        load_model(first)
    message = str(info.value)
    assert message.startswith(f"{first / swapped}: not the file this export wrote") and "\n" not in message
    load_model(second)  # the untouched export loads


def test_an_export_from_before_the_marker_still_loads_and_is_exported_over(tmp_path):
    """Exports written before the marker (and before checksums) are recognised by their config.json format."""
    import json

    target = tmp_path / "old"
    model, tok = tiny_parts(0)
    export_model(target, model, tok, CFG)
    (target / "lingmao-export.json").unlink()
    config = json.loads((target / "config.json").read_text())
    del config["sha256"]
    (target / "config.json").write_text(json.dumps(config))
    assert torch.equal(load_model(target).model.head.weight, model.head.weight)
    newer, _ = tiny_parts(1)
    export_model(target, newer, tok, CFG)
    assert (target / "lingmao-export.json").is_file()
    assert torch.equal(load_model(target).model.head.weight, newer.head.weight)


@pytest.mark.slow
def test_the_app_keeps_a_file_put_into_its_export_folder(small_corpus, tmp_path):
    train, test = small_corpus
    target = tmp_path / "export"
    cfg = compose_config([*tiny_overrides(tmp_path, train, test, steps=3), f"model_save_dir={target}",
                          "run_test=false", "auto_resume=false"])
    train_run(cfg)
    (target / "notes.txt").write_text("the user's notes")
    train_run(cfg)
    assert (target / "notes.txt").read_text() == "the user's notes"
    load_model(target)


def stamped_parts(version: int):
    """A tiny model whose first weight matrix is filled with `version`: each export of the loop below differs
    from the one before, so an export torn between two of them is seen."""
    model, tok = tiny_parts()
    with torch.no_grad():
        next(model.parameters()).fill_(float(version))
    return model, tok


def export_version(target: Path) -> int:
    """The version of the export in `target`, after checking that its files belong together: the weights and
    tokenizer are those whose checksums its config.json records."""
    from lingmao.export import CONFIG, TOKENIZER, WEIGHTS
    from lingmao.io import file_sha256

    loaded = load_model(target)  # finishes an export caught between commit and move, if there is one
    recorded = json.loads((target / CONFIG).read_text(encoding="utf-8"))["sha256"]
    assert recorded == {name: file_sha256(target / name) for name in (WEIGHTS, TOKENIZER)}, "a torn export"
    values = next(loaded.model.parameters()).unique()
    assert len(values) == 1
    return int(values.item())


def _export_forever(target: str, first: int, ready: multiprocessing.synchronize.Event) -> None:
    export_model(target, *stamped_parts(first), CFG)
    ready.set()
    for version in itertools.count(first + 1):
        export_model(target, *stamped_parts(version), CFG)


@pytest.mark.slow
def test_kill_9_at_random_moments_always_leaves_a_whole_export(tmp_path):
    """Each kill leaves one whole export (never a mix of two), the newest committed one or the one before; the
    next load or export finishes one caught while moving into place."""
    target = tmp_path / "export"
    rng = random.Random(7)
    context = multiprocessing.get_context("fork")
    version = 0
    for _ in range(20):
        ready = context.Event()
        proc = context.Process(target=_export_forever, args=(str(target), version + 1, ready))
        proc.start()
        assert ready.wait(60)
        time.sleep(rng.uniform(0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        found = export_version(target)
        assert found > version, "each kill leaves the newest export this process committed, or the one before"
        version = found
        assert not (target / READY).exists()
    # Stray staging folders are the next export's to remove; none of them is ever read.
    export_model(target, *tiny_parts(), CFG)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "lingmao-export.json", "model.safetensors",
                                                         "tokenizer.json"]


def _die_while_moving_into_place(target: str) -> None:
    """Export version 2 over version 1 and die of SIGKILL after its first file has moved into place."""
    from lingmao import export

    export_model(target, *stamped_parts(1), CFG)
    replace, calls = os.replace, []

    def replace_then_die(src, dst):
        replace(src, dst)
        calls.append(dst)
        if len(calls) == 2:  # 1: the commit (staging -> .export-ready), 2: the first file moved into place
            os.kill(os.getpid(), signal.SIGKILL)

    export.os.replace = replace_then_die
    export_model(target, *stamped_parts(2), CFG)


@pytest.mark.parametrize("finisher", ["load", "export"])
def test_an_export_killed_while_moving_into_place_is_finished_by_the_next_load_or_export(tmp_path, finisher):
    target = tmp_path / "export"
    proc = multiprocessing.get_context("fork").Process(target=_die_while_moving_into_place, args=(str(target),))
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert (target / READY).is_dir(), "killed after the commit: the new export waits in .export-ready"
    if finisher == "export":
        export_model(target, *stamped_parts(3), CFG)
        assert export_version(target) == 3
    else:
        assert export_version(target) == 2, "the committed export, whole"
    assert not (target / READY).exists()


# ----------------------------------------------------------------------------------------------
# Checkpoints that cannot run code
# ----------------------------------------------------------------------------------------------
class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "crafted.ckpt"
    model, _ = tiny_parts()
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"payload": RunsCode(marker)}}, path)
    return path, marker


def test_a_code_running_checkpoint_is_refused_and_runs_nothing(crafted):
    path, marker = crafted
    with pytest.raises(LingmaoError) as info:
        load_checkpoint_file(path)
    assert "refused" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.slow
def test_every_app_refuses_it_with_one_line(crafted, small_corpus, tmp_path):
    path, marker = crafted
    train, test = small_corpus
    results = run_modules({
        "generate": ("lingmao.generate", f"ckpt={path}", f"tokenizer={train}"),
        "evaluate": ("lingmao.evaluate", f"ckpt={path}", f"data.test_file={test}"),
        "train": ("lingmao.train", *tiny_overrides(tmp_path, train, test, steps=2), f"resume_from={path}"),
    }, cwd=tmp_path)
    for app, proc in results.items():
        assert proc.returncode == 2, (app, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "refused" in proc.stderr, (app, proc.stderr[-2000:])
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# last.ckpt across stop/resume cycles, and the metrics rows
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_three_stop_resume_cycles_one_last_ckpt_and_aligned_metrics(tmp_path, small_corpus, monkeypatch, caplog):
    """Stopped by SIGTERM, SIGINT and SIGTERM again at steps of no checkpoint, resumed each time by the same
    command: one last.ckpt, always the newest; then finished and tested: every row of metrics.csv keeps its
    values under its own headers."""
    train, test = small_corpus
    ckpts = tmp_path / "outputs" / "runs" / "sig" / "checkpoints"
    last = ckpts / "last.ckpt"

    def cfg(steps: int):
        return compose_config([*tiny_overrides(tmp_path, train, test, steps=steps), "run_name=sig",
                               "checkpoint_every_n_steps=2", "trainer.val_check_interval=50",
                               "trainer.log_every_n_steps=1", f"model_save_dir={tmp_path / 'export'}"])

    caplog.set_level(logging.INFO, logger="lingmao")
    saved = 0
    for cycle, (step, signum) in enumerate([(3, signal.SIGTERM), (7, signal.SIGINT), (11, signal.SIGTERM)]):
        caplog.clear()
        with pytest.raises(TrainingInterrupted) as info:
            train_with(monkeypatch, cfg(100), SignalAt(step, signum))
        if cycle:
            assert f"resuming from {last}: epoch 0, step {saved}" in caplog.text, caplog.text[-3000:]
        assert info.value.step == step and info.value.checkpoint == last
        saved = step
        assert torch.load(last, weights_only=True)["global_step"] == saved
        assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("last")) == ["last.ckpt"]
    train_with(monkeypatch, cfg(saved + 4))
    with open(ckpts.parent / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["train/loss"]]
    assert train_rows and any(r["test/loss"] for r in rows)
    for r in train_rows:
        assert float(r["train/ppl"]) == pytest.approx(math.exp(float(r["train/loss"])), rel=1e-4), r
        assert 0 < float(r["lr"]) <= 1e-3 * (1 + 1e-6) and float(r["tokens_per_sec"]) > 0, r
    assert {r["session"] for r in train_rows} == {"1.0", "2.0", "3.0", "4.0"}
    assert [int(float(r["step"])) for r in train_rows] == list(range(1, saved + 5))  # each step once


# ----------------------------------------------------------------------------------------------
# Atomic writes and the user's umask
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_files_get_the_users_permissions(small_corpus, tmp_path):
    train, test = small_corpus
    cfg = compose_config([*tiny_overrides(tmp_path, train, test, steps=2), "run_name=perm", "run_test=false"])
    umask = os.umask(0o022)
    try:
        train_run(cfg)
    finally:
        os.umask(umask)
    run_dir = tmp_path / "outputs" / "runs" / "perm"
    for path in [run_dir / "export", *(run_dir / "export").iterdir(), run_dir / "checkpoints" / "last.ckpt",
                 run_dir / "config.yaml", run_dir / "finished.json"]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


@pytest.mark.parametrize("writer", ["config", "summary", "finished"])
def test_a_crash_while_writing_leaves_the_old_file(tmp_path, monkeypatch, writer):
    """Each file is written to a temporary file and renamed over the old one: a crash before the rename
    (here: the rename itself fails) leaves the previous content whole."""
    import json

    from omegaconf import OmegaConf

    from lingmao import io, report, sweep

    if writer == "config":
        path = tmp_path / "config.yaml"
        write = lambda: report.announce_config(OmegaConf.create({"a": 2}), tmp_path, print_tree=False)  # noqa: E731
    elif writer == "summary":
        path = tmp_path / "summary.csv"
        (tmp_path / "job").mkdir()
        (tmp_path / "job" / "result.json").write_text(json.dumps(
            {"overrides": ["a=1"], "best_val_loss": 1.0, "status": "completed", "job_dir": "job"}))
        write = lambda: sweep.write_summary(tmp_path)  # noqa: E731
    else:
        path = tmp_path / "finished.json"
        cfg = OmegaConf.create({"trainer": {"max_steps": 1, "max_epochs": -1}, "seed": 1})
        write = lambda: sweep.mark_finished(tmp_path, cfg, 1.0, 1.0, 1)  # noqa: E731
    path.write_text("the previous, complete file")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write()
    assert path.read_text() == "the previous, complete file"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
