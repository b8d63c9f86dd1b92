"""Exact resume: a run stopped at step K and resumed sees the same batches and losses as one never stopped;
resuming into another model stops with a message that lists the differences; a run is the config it started
with; a damaged checkpoint falls back to the newest good one; warm-up and the epoch-checkpoint interval are the
run's, not each process's."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

import lingmao.train as train_mod
from lingmao.callbacks.checkpoints import EpochCheckpoint
from lingmao.checkpointing import TrainingInterrupted, find_resume_checkpoint
from lingmao.config import compose_config
from lingmao.errors import LingmaoError
from tests.conftest import SAMPLE, SignalAt, cut_corpus, tiny_overrides, train_with

TOTAL_STEPS = 14


class Recorder(L.Callback):
    """Per optimizer step: (step, epoch, first tokens of the batch, loss)."""

    def __init__(self, rows: list) -> None:
        self.rows = rows

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        x, _ = batch
        self.rows.append((trainer.global_step, trainer.current_epoch, tuple(x[:, 0].tolist()), float(outputs["loss"])))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("corpus")
    # 24 poems: about 6 batches of 8 windows an epoch, so 14 steps cross two epoch ends.
    return cut_corpus(SAMPLE / "train.jsonl", d / "train.jsonl", 24), cut_corpus(SAMPLE / "test.jsonl", d / "v", 8)


def make_cfg(tmp_path: Path, corpus, *extra: str):
    train, test = corpus
    overrides = [
        *tiny_overrides(tmp_path, train, test, steps=TOTAL_STEPS),
        "trainer.val_check_interval=4", "trainer.limit_val_batches=2", "checkpoint_every_n_steps=5",
        "export=false", "run_test=false", "trainer.log_every_n_steps=1", *extra,
    ]
    return compose_config(overrides)


def run(monkeypatch, cfg, stop_at: int | None = None) -> list:
    """The rows of a run of `cfg`, stopped by SIGTERM at optimizer step `stop_at` if given."""
    rows: list = []
    train_with(monkeypatch, cfg, Recorder(rows), SignalAt(stop_at))
    return rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    mp = pytest.MonkeyPatch()
    try:
        return run(mp, make_cfg(tmp_path_factory.mktemp("ref"), corpus, "run_name=ref"))
    finally:
        mp.undo()


def steps_per_epoch(rows: list) -> int:
    return next(step for step, epoch, *_ in rows if epoch == 1) - 1


@pytest.mark.slow
@pytest.mark.parametrize("where", ["mid_epoch", "last_batch_of_epoch"])
def test_stopped_and_resumed_run_equals_uninterrupted(monkeypatch, tmp_path, corpus, reference, where):
    per_epoch = steps_per_epoch(reference)
    assert 2 < per_epoch < TOTAL_STEPS // 2, per_epoch
    stop = per_epoch // 2 + 1 if where == "mid_epoch" else per_epoch
    cfg = make_cfg(tmp_path, corpus, "run_name=cut")

    with pytest.raises(TrainingInterrupted) as info:
        run(monkeypatch, cfg, stop_at=stop)
    assert info.value.exit_code == 143 and info.value.step == stop
    ckpt = torch.load(info.value.checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == stop

    resumed = run(monkeypatch, cfg)  # auto_resume=true is the default: the same command continues
    head = [r for r in reference if r[0] <= stop]
    tail = [r for r in reference if r[0] > stop]
    assert [r[0] for r in resumed] == [r[0] for r in tail]
    assert [r[1:3] for r in resumed] == [r[1:3] for r in tail], "the resumed run saw other batches"
    worst = max(abs(a[3] - b[3]) for a, b in zip(resumed, tail, strict=True))
    print(f"\n{where}: stopped at step {stop} ({per_epoch} steps an epoch), largest loss difference {worst:.3g}")
    assert worst <= 1e-6
    assert len(head) == stop


@pytest.mark.slow
def test_resume_into_another_model_lists_the_differences(monkeypatch, tmp_path, corpus):
    cfg = make_cfg(tmp_path, corpus, "run_name=shape", "trainer.max_steps=2")
    run(monkeypatch, cfg)
    changed = make_cfg(tmp_path, corpus, "run_name=shape", "trainer.max_steps=8", "model.d_model=48", "model.nhead=4")
    with pytest.raises(LingmaoError) as info:
        train_mod.train(changed)
    msg = str(info.value)
    assert "model.d_model: checkpoint 32, now 48" in msg and "model.nhead: checkpoint 2, now 4" in msg
    assert "auto_resume=false" in msg and "last.ckpt" in msg and "\n" not in msg


@pytest.mark.slow
def test_crash_saves_a_crash_checkpoint_and_reraises(monkeypatch, tmp_path, corpus, capsys):
    from lingmao.module import LingmaoLM

    step = LingmaoLM.training_step

    def failing(self, batch, batch_idx):
        if self.trainer.global_step == 3:
            raise RuntimeError("boom")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(LingmaoLM, "training_step", failing)
    with pytest.raises(RuntimeError, match="boom"):
        train_mod.train(make_cfg(tmp_path, corpus, "run_name=crash", "trainer.val_check_interval=100"))
    crash = tmp_path / "outputs" / "runs" / "crash" / "checkpoints" / "crash.ckpt"
    assert torch.load(crash, map_location="cpu", weights_only=True)["global_step"] == 3
    err = capsys.readouterr().err
    assert f"training crashed at step 3 (RuntimeError); saved {crash}" in err and f"resume_from={crash}" in err


def _loader(n: int = 40, batch: int = 4):
    from lingmao.data import EpochShuffleSampler, ResumableDataLoader

    data = torch.arange(n)
    return ResumableDataLoader(data, batch_size=batch, sampler=EpochShuffleSampler(n, seed=7), drop_last=True)


def _flat(batches) -> list[int]:
    return [int(i) for b in batches for i in b]


def test_loader_state_continues_mid_epoch_at_epoch_end_and_with_another_batch_size():
    a = _loader()
    a.sampler.set_epoch(2)
    it = iter(a)
    seen = [next(it) for _ in range(3)]
    state = a.state_dict()
    rest = list(it)
    assert state == {"epoch": 2, "done": 12, "world_size": 1, "seed": 7, "length": 40}

    b = _loader()
    b.load_state_dict(state)
    assert _flat(b) == _flat(rest)  # the same samples, in the same order
    assert sorted(_flat(seen) + _flat(rest)) == list(range(40))

    end = a.state_dict()  # the epoch ran out: a resume starts the next epoch at its beginning
    c = _loader()
    c.load_state_dict(end)
    d = _loader()
    d.sampler.set_epoch(3)
    assert _flat(c) == _flat(d)

    e = _loader(batch=8)  # night mode halves or doubles batch sizes: the position is in samples
    e.load_state_dict(state)
    got = _flat(e)
    assert got == _flat(rest)[:24]  # 28 samples were left: three whole batches of 8


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes_sees_each_window_once(monkeypatch, before, after):
    """Ranks are simulated by setting what the sampler reads from torch.distributed; the loaders are real."""
    from lingmao.data import EpochShuffleSampler, ResumableDataLoader, windows

    def loaders(world: int, state: dict | None = None) -> list:
        out = []
        for rank in range(world):
            monkeypatch.setattr(windows, "rank_and_world", lambda r=rank, w=world: (r, w))
            loader = ResumableDataLoader(list(range(60)), batch_size=4, sampler=EpochShuffleSampler(60, seed=3))
            if state is not None:
                loader.load_state_dict(state)
            it = iter(loader)
            out.append((rank, world, loader, it))
        return out

    def take(group, batches: int) -> tuple[list[int], dict]:
        seen, state = [], None
        for rank, world, loader, it in group:
            monkeypatch.setattr(windows, "rank_and_world", lambda r=rank, w=world: (r, w))
            for _ in range(batches):
                seen += next(it).tolist()
            if rank == 0:
                state = loader.state_dict()  # Lightning saves rank 0's loader state
        return seen, state

    first, state = take(loaders(before), 3)
    assert state["world_size"] == before and state["done"] == 3 * 4 * before
    rest = []
    for rank, world, _loader, it in loaders(after, state):
        monkeypatch.setattr(windows, "rank_and_world", lambda r=rank, w=world: (r, w))
        rest += [i for batch in it for i in batch.tolist()]
    assert sorted(first + rest) == list(range(60))  # every window of the epoch, each exactly once


# ----------------------------------------------------------------------------------------------
# A run is its config
# ----------------------------------------------------------------------------------------------
def _files(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_run_is_the_config_it_started_with(tmp_path, corpus, caplog):
    """The run folder records the training config and its hash, and so does every checkpoint; the keys meant to
    change on resume (the schedule's length, learning rates, the machine) resume; any other change, an optimizer
    switch included, is refused in one line with the difference and the two ways on; resume_changed=accept
    continues with the new settings."""

    def cfg(*extra: str):
        return make_cfg(tmp_path, corpus, "run_name=cfg", "trainer.max_steps=2", *extra)

    train_mod.train(cfg())
    run_dir = tmp_path / "outputs" / "runs" / "cfg"
    record = json.loads((run_dir / "training_config.json").read_text())
    from lingmao import runs

    assert record["hash"] == runs.config_hash(record["config"]) and record["config"]["optim.name"] == "adamw"
    assert {"model.d_model", "data.context_length", "seed", "optim.weight_decay"} <= set(record["config"])
    assert not {"trainer.max_steps", "optim.lr", "hardware.cpu_threads", "night.enabled"} & set(record["config"])
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["lingmao"]["config"] == \
        record["config"]

    before = _files(run_dir)
    for extra, difference in (
        ("optim.weight_decay=0.05", "optim.weight_decay: checkpoint 0.1, now 0.05"),
        ("optim=muon", "optim.name: checkpoint 'adamw', now 'muon'"),
        ("seed=7", "seed: checkpoint 1337, now 7"),
        ("data.stride=16", "data.stride: checkpoint None, now 16"),
    ):
        with pytest.raises(LingmaoError) as info:
            train_mod.train(cfg("trainer.max_steps=4", extra))
        message = str(info.value)
        assert difference in message and "\n" not in message, message
        assert "run_name=" in message and "resume_changed=accept" in message and "last.ckpt" in message
        assert _files(run_dir) == before  # refused before anything was written

    resumed = train_mod.train(cfg("trainer.max_steps=3", "optim.lr=5e-4", "hardware.cpu_threads=2",
                                  "night=default", "night.now=12:00"))
    assert resumed.global_step == 3
    with caplog.at_level(logging.WARNING):
        switched = train_mod.train(cfg("trainer.max_steps=5", "optim=muon", "resume_changed=accept"))
    assert switched.global_step == 5
    assert "the new optimizer starts afresh" in caplog.text
    now = json.loads((run_dir / "training_config.json").read_text())
    assert now["config"]["optim.name"] == "muon" and now["hash"] != record["hash"]
    # An accepted change takes effect: loading the optimizer state does not bring the checkpoint's value back.
    train_mod.train(cfg("trainer.max_steps=6", "optim=muon", "optim.weight_decay=0.05", "resume_changed=accept"))
    groups = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0][
        "param_groups"]
    assert {g["name"]: g["weight_decay"] for g in groups}["decay"] == 0.05


# ----------------------------------------------------------------------------------------------
# A damaged checkpoint falls back
# ----------------------------------------------------------------------------------------------
def _checkpoint(path: Path, step: int, age_s: float = 0.0) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": step}, path)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_good_one(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    _checkpoint(ckpts / "epoch000.ckpt", 4, age_s=300)
    good = _checkpoint(ckpts / "epoch001.ckpt", 8, age_s=200)
    torn = _checkpoint(ckpts / "epoch002.ckpt", 12, age_s=100)
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # a copy cut short
    (ckpts / "last.ckpt").write_bytes(b"\x00" * 512)  # overwritten by something else
    (ckpts / "last.ckpt.damaged").write_bytes(b"set aside by an earlier run")
    with caplog.at_level(logging.WARNING, logger="lingmao.checkpointing"):
        chosen = find_resume_checkpoint(None, True, ckpts)
    assert chosen == good
    assert (ckpts / "last.ckpt.1.damaged").read_bytes() == b"\x00" * 512  # kept, beside the earlier one
    assert (ckpts / "last.ckpt.damaged").read_bytes() == b"set aside by an earlier run"
    assert (ckpts / "epoch002.ckpt.damaged").is_file() and not torn.exists()
    assert f"resuming from {good}, the newest good checkpoint" in caplog.text
    assert "kept as last.ckpt.1.damaged" in caplog.text and "kept as epoch002.ckpt.damaged" in caplog.text
    assert find_resume_checkpoint(None, True, ckpts) == good  # and the next run goes straight there


def test_when_no_checkpoint_is_good_the_error_is_one_line_and_nothing_is_renamed(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "last.ckpt").write_bytes(b"not a checkpoint")
    (ckpts / "epoch000.ckpt").write_bytes(b"")
    with pytest.raises(LingmaoError) as info:
        find_resume_checkpoint(None, True, ckpts)
    message = str(info.value)
    assert message.startswith(f"{ckpts / 'last.ckpt'}: not a checkpoint") and "auto_resume=false" in message
    assert "\n" not in message
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch000.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_a_run_whose_last_checkpoint_is_damaged_continues_from_its_epoch_checkpoint(monkeypatch, tmp_path, corpus):
    cfg = make_cfg(tmp_path, corpus, "run_name=torn", "trainer.max_steps=8")
    rows = run(monkeypatch, cfg)
    per_epoch = steps_per_epoch(rows)
    ckpts = tmp_path / "outputs" / "runs" / "torn" / "checkpoints"
    assert torch.load(ckpts / "epoch000.ckpt", weights_only=True)["global_step"] == per_epoch
    (ckpts / "last.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:1000])  # a torn copy
    resumed = run(monkeypatch, make_cfg(tmp_path, corpus, "run_name=torn", "trainer.max_steps=10"))
    assert resumed[0][0] == per_epoch + 1 and resumed[-1][0] == 10
    assert (ckpts / "last.ckpt.damaged").stat().st_size == 1000


# ----------------------------------------------------------------------------------------------
# Warm-up and the epoch-checkpoint interval belong to the run
# ----------------------------------------------------------------------------------------------
class LearningRates(L.Callback):
    def __init__(self, rows: list) -> None:
        self.rows = rows

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rows.append((trainer.global_step + 1, optimizer.param_groups[0]["lr"]))


def run_rates(monkeypatch, cfg) -> list:
    rows: list = []
    original = train_mod.instantiate_callbacks
    monkeypatch.setattr(train_mod, "instantiate_callbacks", lambda c: [LearningRates(rows), *original(c)])
    train_mod.train(cfg)
    return rows


@pytest.mark.slow
def test_extending_a_finished_run_does_not_warm_up_again(monkeypatch, tmp_path, corpus):
    """4 steps with optim.warmup_steps=6: more than half the run, so it warms up over 1 step. Extended to 20
    steps, 6 would fit, but the run warmed up already: it goes on down its cosine, never up again."""
    common = ("run_name=warm", "optim.warmup_steps=6", "optim.lr=1e-3", "optim.min_lr_ratio=0.1",
              "trainer.val_check_interval=100")
    first = run_rates(monkeypatch, make_cfg(tmp_path, corpus, *common, "trainer.max_steps=4"))
    assert [step for step, _ in first] == [1, 2, 3, 4] and first[0][1] == pytest.approx(1e-3)
    later = run_rates(monkeypatch, make_cfg(tmp_path, corpus, *common, "trainer.max_steps=20"))
    assert [step for step, _ in later] == list(range(5, 21))
    rates = [lr for _, lr in later]
    assert rates[0] > 0.9e-3  # the cosine over 20 steps at step 5 (0.95 of the peak), not (4 + 1) / 6 of it
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))  # down the cosine, never up
    assert rates[-1] == pytest.approx(1e-4, rel=0.1)  # to the floor at the new end


def test_the_epoch_checkpoint_interval_counts_from_the_newest_epoch_checkpoint(tmp_path, monkeypatch):
    """A new process (a resume) finds an epoch checkpoint written 2 minutes ago by the one before: the next
    is not due before the 10 minutes are up."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    saves: list[int] = []
    monkeypatch.setattr(ModelCheckpoint, "on_train_epoch_end", lambda self, trainer, module: saves.append(1))
    trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda value, src=0: value))
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    _checkpoint(ckpts / "epoch003.ckpt", 30, age_s=120)
    resumed = EpochCheckpoint(str(ckpts), every_n_epochs=1, min_interval_minutes=10)
    resumed.on_train_epoch_end(trainer, None)
    assert saves == []
    _checkpoint(ckpts / "epoch003.ckpt", 30, age_s=11 * 60)
    resumed.on_train_epoch_end(trainer, None)
    assert saves == [1]
    fresh = EpochCheckpoint(str(tmp_path / "empty"), every_n_epochs=1, min_interval_minutes=10)
    fresh.on_train_epoch_end(trainer, None)  # no epoch checkpoint yet: the first is written
    assert saves == [1, 1]
