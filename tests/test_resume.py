"""Exact resume: a run stopped at step K and resumed sees the same batches and losses as one never stopped;
resuming into another model stops with a message that lists the differences."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

import lingmao.train as train_mod
from lingmao.checkpointing import TrainingInterrupted
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
