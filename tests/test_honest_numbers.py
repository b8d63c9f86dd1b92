"""The figures a run prints are the ones users decide by: a schedule that follows the config on resume, short
runs that validate at their end and say when they are useless, times that add up, configs that cannot end."""

from __future__ import annotations

import csv
import logging
import math
import re

import lightning as L
import pytest
import torch

import lingmao.train as train_mod
from lingmao.config import compose_config, validate
from lingmao.errors import LingmaoError
from tests.conftest import script_night_clock, tiny_overrides, train_with


class LearningRates(L.Callback):
    """The learning rate each optimizer step actually used, with its epoch."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.rows.append((trainer.global_step, trainer.current_epoch, optimizer.param_groups[0]["lr"]))
        self.groups = getattr(self, "groups", []) + [{g.get("name"): g["lr"] for g in optimizer.param_groups}]


def run(monkeypatch, overrides: list[str]) -> LearningRates:
    recorder = LearningRates()
    train_with(monkeypatch, compose_config(overrides), recorder, first=False)
    return recorder


def cosine(step: int, warmup: int, total: float, lr: float, floor: float = 0.1) -> float:
    """Warm-up then cosine to floor * lr at `total`, written out here independently of lingmao.module."""
    if step < warmup:
        return lr * (step + 1) / warmup
    q = min(1.0, (step - warmup) / (total - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * q)))


@pytest.mark.slow
def test_resume_follows_the_schedule_of_its_own_command(small_corpus, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="lingmao")
    train, test = small_corpus
    base = [o for o in tiny_overrides(tmp_path, train, test) if not o.startswith("trainer.max_steps")]
    base += ["run_name=longer", "run_test=false", "export=false", "trainer.val_check_interval=1000"]
    first = run(monkeypatch, [*base, "trainer.max_steps=30"])
    assert [s for s, _, _ in first.rows] == list(range(30))
    for step, _, lr in first.rows:
        assert lr == pytest.approx(cosine(step, 5, 30, 1e-3), rel=1e-6)

    # Training longer, at another rate: from step 30 on, the new cosine (ending at 60) at the new rate.
    second = run(monkeypatch, [*base, "trainer.max_steps=60", "optim.lr=2e-3"])
    assert [s for s, _, _ in second.rows] == list(range(30, 60))
    for step, _, lr in second.rows:
        assert lr == pytest.approx(cosine(step, 5, 60, 2e-3), rel=1e-6)
    assert second.rows[0][2] > 5 * first.rows[-1][2]  # not the floor of the finished schedule
    assert "trainer.max_steps 30 -> 60" in caplog.text and "optim.lr 0.001 -> 0.002" in caplog.text


@pytest.mark.slow
def test_muon_groups_follow_their_own_curves_and_resume(small_corpus, tmp_path, monkeypatch, caplog):
    """The app's default optimizer: AdamW's groups on optim.*, Muon's on optim.muon.*; a resume at another
    Muon rate follows it from the resumed step on."""
    caplog.set_level(logging.INFO, logger="lingmao")
    train, test = small_corpus
    base = [o for o in tiny_overrides(tmp_path, train, test) if not o.startswith(("trainer.max_steps", "optim"))]
    base += ["optim=muon", "optim.lr=2e-3", "optim.warmup_steps=4", "optim.muon.warmup_steps=2",
             "optim.muon.min_lr_ratio=0.5", "run_name=muon", "run_test=false", "export=false"]
    first = run(monkeypatch, [*base, "trainer.max_steps=8", "optim.muon.lr=0.02"])
    assert [set(g) for g in first.groups] == [{"decay", "no_decay", "muon"}] * 8
    for step, groups in enumerate(first.groups):
        assert groups["decay"] == groups["no_decay"] == pytest.approx(cosine(step, 4, 8, 2e-3), rel=1e-6)
        assert groups["muon"] == pytest.approx(cosine(step, 2, 8, 0.02, floor=0.5), rel=1e-6)
    second = run(monkeypatch, [*base, "trainer.max_steps=12", "optim.muon.lr=0.01"])
    assert [s for s, _, _ in second.rows] == list(range(8, 12))
    for step, groups in zip(range(8, 12), second.groups, strict=True):
        assert groups["muon"] == pytest.approx(cosine(step, 2, 12, 0.01, floor=0.5), rel=1e-6)
        assert groups["decay"] == pytest.approx(cosine(step, 4, 12, 2e-3), rel=1e-6)
    assert "optim.muon.lr 0.02 -> 0.01" in caplog.text


@pytest.mark.slow
def test_an_epoch_limited_schedule_follows_epochs_when_night_changes_the_steps(small_corpus, tmp_path, monkeypatch):
    """Night halves the batch in epoch 1 (twice the steps); the rate still reaches each epoch's point of the curve."""
    train, test = small_corpus
    overrides = [o for o in tiny_overrides(tmp_path, train, test, steps=-1) if o != "night=off"] + [
        "night=default", "trainer.max_epochs=3", "++trainer.limit_train_batches=4",
        "optim.warmup_steps=0", "run_test=false", "export=false", "trainer.val_check_interval=1000",
        "hardware.cpu_threads=1",
    ]
    script_night_clock(monkeypatch, "12:00", "23:00", "12:00")
    rows = run(monkeypatch, overrides).rows
    per_epoch = {e: [r for r in rows if r[1] == e] for e in range(3)}
    assert [len(per_epoch[e]) for e in range(3)] == [4, 4, 4]  # limit_train_batches caps each epoch
    for epoch in range(3):
        step, _, lr = per_epoch[epoch][0]
        expected = cosine(epoch, 0, 3, 1e-3) * (0.75 if epoch == 1 else 1.0)  # night scales the rate by 0.75
        assert lr == pytest.approx(expected, rel=1e-6), (epoch, lr, expected)


@pytest.mark.slow
def test_a_short_run_validates_at_its_end_and_says_it_learned_nothing(small_corpus, tmp_path, caplog):
    """The README's own-JSONL example shape: 50 steps, default warm-up (100) and validation interval (200)."""
    caplog.set_level(logging.INFO, logger="lingmao")
    train, test = small_corpus
    overrides = [o for o in tiny_overrides(tmp_path, train, test, steps=50)
                 if not o.startswith(("trainer.val_check_interval", "optim.warmup_steps"))]
    # A learning rate too small to learn anything in 50 steps: worse than character frequencies, for sure.
    result = train_mod.train(compose_config([*overrides, "run_name=short", "optim.lr=1e-7"]))
    assert "optim.warmup_steps=100 is more than half of this run's 50 steps: warming up over 5 steps" in caplog.text
    run_dir = tmp_path / "outputs" / "runs" / "short"
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [r["step"] for r in rows if r["val/loss"]] == ["50"]  # validated at its end
    assert result.best_val_loss is not None and result.test.worse_than_unigram
    assert "NO BETTER than character frequencies" in caplog.text
    assert len(list((run_dir / "checkpoints").glob("epoch*.ckpt"))) <= 1  # not one every few seconds


@pytest.mark.slow
def test_times_add_up_across_two_resumes(small_corpus, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="lingmao")
    train, test = small_corpus
    base = [o for o in tiny_overrides(tmp_path, train, test) if not o.startswith("trainer.max_steps")]
    base += ["run_name=times", "run_test=false", "export=false", "trainer.log_every_n_steps=4"]
    for steps in (8, 16, 24):
        caplog.clear()
        train_mod.train(compose_config([*base, f"trainer.max_steps={steps}"]))
    summary = caplog.text[caplog.text.index("run summary"):]
    wall = re.search(r"wall time +(\S+) this session, (\S+) in all \(3 sessions\)", summary)
    trained = re.search(r"training time +(\S+) this session, (\S+) in all", summary)
    assert wall and trained, summary

    def seconds(text: str) -> int:
        m, s = re.fullmatch(r"(\d+)m(\d+)s", text).groups()
        return int(m) * 60 + int(s)

    assert seconds(trained.group(1)) <= seconds(wall.group(1)) <= seconds(wall.group(2))
    assert seconds(trained.group(2)) <= seconds(wall.group(2))
    state = torch.load(tmp_path / "outputs" / "runs" / "times" / "checkpoints" / "last.ckpt", weights_only=True)
    monitor = next(v for k, v in state["callbacks"].items() if "TrainingMonitor" in k)
    assert monitor["session"] == 3 and monitor["train_seconds"] <= monitor["wall_seconds"]
    rows = list(csv.DictReader(open(tmp_path / "outputs" / "runs" / "times" / "metrics.csv")))
    assert sorted({r["session"] for r in rows if r["session"]}) == ["1.0", "2.0", "3.0"]


def test_a_run_that_could_never_end_is_refused():
    with pytest.raises(LingmaoError, match="never end") as info:
        validate(compose_config(["trainer.max_steps=-1", "trainer.max_epochs=-1"]))
    assert "\n" not in str(info.value)
