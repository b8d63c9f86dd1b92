"""Night mode: the window and clock, and the batch size, learning rate and threads a running trainer really uses."""

from __future__ import annotations

import csv
import datetime as dt
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

import lingmao.train as train_mod
from lingmao.callbacks import instantiate_callbacks
from lingmao.callbacks.night import (
    NightConfig,
    NightMode,
    NightWindow,
    make_clock,
    night_accumulation,
    night_batch_size,
    parse_time,
)
from lingmao.config import compose_config
from lingmao.errors import LingmaoError
from lingmao.hardware import ProcessLimits
from tests.conftest import cut_corpus, script_night_clock, tiny_overrides, train_with

T = dt.time


# ----------------------------------------------------------------------------------------------
# Window and clock
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("start", "end", "now", "night"),
    [
        ("22:00", "07:00", "23:30", True),   # inside, before midnight
        ("22:00", "07:00", "03:00", True),   # inside, after midnight
        ("22:00", "07:00", "22:00", True),   # start is inside
        ("22:00", "07:00", "07:00", False),  # end is outside
        ("22:00", "07:00", "21:59", False),
        ("22:00", "07:00", "12:00", False),
        ("01:00", "05:00", "03:00", True),   # a window inside one day
        ("01:00", "05:00", "23:00", False),
        ("22:00", "22:00", "22:30", False),  # empty window
    ],
)
def test_window(start, end, now, night):
    window = NightWindow(parse_time(start, "night.start"), parse_time(end, "night.end"))
    assert window.contains(parse_time(now, "night.now")) is night


def test_empty_window_disables_night_mode():
    for start, end in [(None, "07:00"), ("", "07:00"), ("22:00", None), ("22:00", "22:00")]:
        window = NightWindow(parse_time(start, "night.start"), parse_time(end, "night.end"))
        assert window.empty and not window.contains(T(23, 0))
        assert not NightMode(NightConfig(start=start, end=end), clock=lambda: T(23, 0)).enabled


def test_parse_time_errors_name_the_key():
    assert parse_time("07:30:15", "night.end") == T(7, 30, 15)
    with pytest.raises(LingmaoError, match=r"night\.start: \"25:00\" is not a time"):
        parse_time("25:00", "night.start")
    # YAML 1.1 reads an unquoted 22:00 as 1320: say so.
    with pytest.raises(LingmaoError, match=r"night\.start:.*unquoted 22:00.*quote it"):
        parse_time(1320, "night.start")


def test_clocks(monkeypatch):
    assert make_clock("23:30")() == T(23, 30)
    local = make_clock(None)
    script_night_clock(monkeypatch, "21:59", "22:00")  # the local time, as tests script it
    assert [local() for _ in range(3)] == [T(21, 59), T(22, 0), T(22, 0)]
    with pytest.raises(LingmaoError, match=r'^night\.now: one time of day like "23:30".*not a list$'):
        make_clock(OmegaConf.create({"now": ["21:59", "22:00"]}).now)
    with pytest.raises(LingmaoError, match=r"night\.now: \"late\" is not a time"):
        make_clock("late")


def test_batch_and_accumulation_arithmetic():
    assert night_batch_size(16, 0.5) == 8
    assert night_batch_size(1, 0.5) == 1  # never below 1
    assert night_batch_size(5, 0.5) == 2
    assert night_accumulation(16, 1, 8) == 2
    assert night_accumulation(16, 2, 8) == 4
    assert night_accumulation(1, 1, 1) == 1


@pytest.mark.parametrize(
    ("key", "value"),
    [("batch_size_factor", 0), ("batch_size_factor", 1.5), ("lr_factor", 0), ("cpu_fraction", 2),
     ("gpu_memory_fraction", -0.5), ("check_every_n_steps", -1)],
)
def test_settings_errors(key, value):
    with pytest.raises(LingmaoError, match=rf"night\.{key}={value}: out of range"):
        NightConfig(**{key: value})


def night_callback(*overrides: str) -> NightMode:
    cfg = compose_config(list(overrides))
    return next(c for c in instantiate_callbacks(cfg.callbacks) if isinstance(c, NightMode))


def test_config_groups_build_the_callback():
    cb = night_callback("night.now=23:30")
    assert cb.enabled and str(cb.window) == "22:00-07:00" and cb.clock() == T(23, 30)
    assert cb.settings == NightConfig(now="23:30")
    assert not night_callback("night=off").enabled


# ----------------------------------------------------------------------------------------------
# Limits on CUDA / MPS, with the torch calls replaced by recorders
# ----------------------------------------------------------------------------------------------
def test_cuda_limits_use_the_memory_fraction(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append(("cap", f, d)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty",)))
    threads = torch.get_num_threads()
    limits = ProcessLimits(cpu_fraction=0.5, gpu_memory_fraction=0.5, base_gpu_fraction=0.8)
    limits.capture(torch.device("cuda", 1))
    assert limits.set(True) == ["gpu memory 80%->50%"]
    assert limits.set(True) == []  # already on: nothing called again
    assert limits.set(False) == ["gpu memory 50%->80%"]
    assert calls == [("cap", 0.5, 1), ("empty",), ("cap", 0.8, 1)]
    assert torch.get_num_threads() == threads  # threads are a CPU limit

    calls.clear()
    limits = ProcessLimits(0.5, 0.5, base_gpu_fraction=0.3)  # never raise a lower hardware cap
    limits.capture(torch.device("cuda", 0))
    limits.set(True)
    limits.set(False)
    assert [c for c in calls if c[0] == "cap"] == [("cap", 0.3, 0), ("cap", 0.3, 0)]


def test_mps_limits_use_the_mps_memory_fraction(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.mps, "set_per_process_memory_fraction", lambda f: calls.append(("cap", f)))
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: calls.append(("empty",)))
    monkeypatch.delenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", raising=False)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # as on macOS
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        limits = ProcessLimits(0.5, 0.5)
        limits.capture(torch.device("mps"))
        assert limits.set(True) == ["threads 2->1", "mps memory limit x0.5"]
        assert torch.get_num_threads() == 1
        assert limits.set(False) == ["threads 1->2", "mps memory limit x1.7"]
        assert calls == [("cap", 0.5), ("empty",), ("cap", 1.7)]
    finally:
        torch.set_num_threads(before)


def _rank_reads_clock(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: rank 0's clock says night, rank 1's says day."""
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        clock = (lambda: T(23, 0)) if rank == 0 else (lambda: T(12, 0))
        cb = NightMode(NightConfig(), clock=clock)
        strategy = DDPStrategy()  # its broadcast is torch.distributed's, over the group just made
        night, now = cb._is_night(SimpleNamespace(strategy=strategy))
        Path(out, f"rank{rank}").write_text(f"{night} {now.isoformat('minutes')}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_processes_follow_rank_zero_clock(tmp_path):
    """Two real processes whose clocks disagree take rank 0's time, so their batch counts cannot differ."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_reads_clock, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    assert (tmp_path / "rank0").read_text() == "True 23:00"
    assert (tmp_path / "rank1").read_text() == "True 23:00"


# ----------------------------------------------------------------------------------------------
# Real short runs on CPU: values read back from the running trainer, optimizer and torch
# ----------------------------------------------------------------------------------------------
class Recorder(L.Callback):
    """What the trainer actually uses at each batch."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rows.append({
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "batch": batch[0].shape[0],
            "threads": torch.get_num_threads(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "accumulation": trainer.accumulate_grad_batches,
        })

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # The run's schedule is flat at optim.lr (no warm-up, floor 1.0): any other rate is night mode's factor.
        self.rows[-1]["lr_scale"] = round(optimizer.param_groups[0]["lr"] / pl_module.hparams["optim"]["lr"], 6)

    def per_epoch(self, key: str) -> dict[int, set]:
        out: dict[int, set] = {}
        for row in self.rows:
            out.setdefault(row["epoch"], set()).add(row[key])
        return out


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    yield
    torch.set_num_threads(threads)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def night_cfg(tmp_path: Path, small_corpus, *extra: str, steps: int = 6, tuner: bool = False):
    """A tiny run with night mode; two fixed threads by day, or the thread tuner's choice with `tuner`."""
    train, test = small_corpus
    base = [o for o in tiny_overrides(tmp_path, train, test, steps=steps)
            if o != "night=off" and not o.startswith("hardware.cpu_threads")]
    group = [] if any(e.startswith("night=") for e in extra) else ["night=default"]
    overrides = [
        *base, *group, f"hardware.cpu_threads={'null' if tuner else 2}", "run_test=false", "export=false",
        "checkpoint_every=0",
        "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0", "optim.warmup_steps=0",
        "optim.min_lr_ratio=1.0", "show_samples=false", *extra,
    ]
    return compose_config(overrides)


def run_recorded(cfg, monkeypatch) -> Recorder:
    recorder = Recorder()
    train_with(monkeypatch, cfg, recorder, first=False)
    return recorder


def half_cpus() -> int | None:
    if not hasattr(os, "sched_getaffinity"):
        return None
    n = len(os.sched_getaffinity(0))
    return max(1, n // 2) if n > 1 else n


@pytest.mark.slow
def test_night_and_day_runs(small_corpus, tmp_path, monkeypatch, caplog, restore_threads):
    caplog.set_level(logging.INFO, logger="lingmao")
    rec = run_recorded(night_cfg(tmp_path / "n", small_corpus, "night.now=23:30"), monkeypatch)
    assert {r["batch"] for r in rec.rows} == {4}
    assert {r["lr_scale"] for r in rec.rows} == {0.75}
    assert {r["threads"] for r in rec.rows} == {1}
    assert {r["cpus"] for r in rec.rows} == {half_cpus()}
    assert {r["accumulation"] for r in rec.rows} == {1}  # keep_effective_batch: false halves samples per step
    assert "night mode on (23:30): batch 8->4, lr x0.75, threads 2->1" in caplog.text
    assert re.search(r"\nnight mode +steps 0-6 \(the end\): batch 8->4, lr x0.75, threads 2->1\n", caplog.text)
    assert torch.get_num_threads() == 2  # restored at the end of fit
    metrics = list(csv.DictReader(open(next((tmp_path / "n").rglob("metrics.csv")))))
    assert {float(m["night"]) for m in metrics if m.get("night")} == {1.0}

    caplog.clear()
    rec = run_recorded(night_cfg(tmp_path / "d", small_corpus, "night.now=12:00"), monkeypatch)
    assert {(r["batch"], r["lr_scale"], r["threads"]) for r in rec.rows} == {(8, 1.0, 2)}
    assert "night mode on" not in caplog.text
    assert "clock 12:00: day" in caplog.text
    assert "\nnight mode " not in caplog.text  # the summary has no night row


@pytest.mark.slow
def test_flip_at_epoch_boundaries(small_corpus, tmp_path, monkeypatch, caplog, restore_threads):
    """21:59 at epoch 0, 22:00 at epoch 1, 07:00 at epoch 2: night mode enters and leaves during the run."""
    caplog.set_level(logging.INFO, logger="lingmao")
    script_night_clock(monkeypatch, "21:59", "22:00", "07:00")
    cfg = night_cfg(tmp_path, small_corpus, "++trainer.limit_train_batches=3", "trainer.max_epochs=3", steps=100)
    rec = run_recorded(cfg, monkeypatch)
    assert rec.per_epoch("batch") == {0: {8}, 1: {4}, 2: {8}}
    assert rec.per_epoch("lr_scale") == {0: {1.0}, 1: {0.75}, 2: {1.0}}
    assert rec.per_epoch("threads") == {0: {2}, 1: {1}, 2: {2}}
    day_cpus = rec.rows[0]["cpus"]
    assert rec.per_epoch("cpus") == {0: {day_cpus}, 1: {half_cpus()}, 2: {day_cpus}}
    assert "night mode on (22:00): batch 8->4, lr x0.75, threads 2->1" in caplog.text
    assert "night mode off (07:00): batch 4->8, lr x1, threads 1->2" in caplog.text
    assert re.search(r"\nnight mode +steps 3-6: batch 8->4, lr x0.75, threads 2->1\n", caplog.text)
    metrics = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    night = {int(m["step"]): float(m["night"]) for m in metrics if m.get("night")}
    assert [night[s] for s in sorted(night)] == [0.0] * 3 + [1.0] * 3 + [0.0] * 3


@pytest.mark.slow
def test_step_checks_move_only_the_limits(small_corpus, tmp_path, monkeypatch, caplog, restore_threads):
    caplog.set_level(logging.INFO, logger="lingmao")
    script_night_clock(monkeypatch, "21:00", "21:00", "23:00")
    cfg = night_cfg(tmp_path, small_corpus, "night.check_every_n_steps=2", steps=6)
    rec = run_recorded(cfg, monkeypatch)
    assert [(r["step"], r["threads"]) for r in rec.rows] == [(0, 2), (1, 2), (2, 2), (3, 2), (4, 1), (5, 1)]
    assert {(r["batch"], r["lr_scale"]) for r in rec.rows} == {(8, 1.0)}  # these wait for the epoch boundary
    assert "night mode limits on (23:00): threads 2->1" in caplog.text
    assert re.search(r"\nnight mode +steps 4-6 \(the end\): threads 2->1\n", caplog.text)


@pytest.mark.slow
def test_limits_lifted_when_the_run_fails(small_corpus, tmp_path, monkeypatch, restore_threads):
    class Boom(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                assert torch.get_num_threads() == 1  # night mode holds until the failure
                raise RuntimeError("boom")

    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    with pytest.raises(RuntimeError, match="boom"):
        train_with(monkeypatch, night_cfg(tmp_path, small_corpus, "night.now=23:30"), Boom(), first=False)
    assert torch.get_num_threads() == 2
    assert cpus is None or os.sched_getaffinity(0) == cpus


@pytest.mark.slow
def test_keep_effective_batch_doubles_accumulation(small_corpus, tmp_path, monkeypatch, caplog, restore_threads):
    caplog.set_level(logging.INFO, logger="lingmao")
    cfg = night_cfg(tmp_path, small_corpus, "night.now=23:30", "night.keep_effective_batch=true", steps=3)
    rec = run_recorded(cfg, monkeypatch)
    assert {(r["batch"], r["accumulation"]) for r in rec.rows} == {(4, 2)}
    assert [r["step"] for r in rec.rows] == [0, 0, 1, 1, 2, 2]  # one optimizer step per two batches
    assert "batch 8->4, accumulation 1->2, lr x0.75" in caplog.text
    assert "samples/step 8->8" in caplog.text


@pytest.mark.slow
def test_resume_takes_the_time_of_resuming_not_the_checkpoint(small_corpus, tmp_path, monkeypatch, caplog,
                                                               restore_threads):
    caplog.set_level(logging.INFO, logger="lingmao")
    common = ("run_name=resume", "checkpoint_every_n_steps=2")
    rec = run_recorded(night_cfg(tmp_path, small_corpus, "night.now=23:30", *common, steps=4), monkeypatch)
    assert {r["lr_scale"] for r in rec.rows} == {0.75}
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert ckpt["lr_schedulers"] == []  # the rate is set from the config at every step, never restored

    caplog.clear()
    rec = run_recorded(night_cfg(tmp_path, small_corpus, "night.now=12:00", *common, steps=6), monkeypatch)
    assert [r["step"] for r in rec.rows] == [4, 5]  # resumed
    assert {(r["batch"], r["lr_scale"], r["threads"]) for r in rec.rows} == {(8, 1.0, 2)}
    # The summary of the resumed run still says what the night before it changed.
    assert re.search(r"\nnight mode +steps 0-4: batch 8->4, lr x0.75, threads 2->1\n", caplog.text)

    # night=off resumes a night checkpoint at the full learning rate too.
    rec = run_recorded(night_cfg(tmp_path, small_corpus, "night=off", *common, steps=8), monkeypatch)
    assert {(r["step"], r["lr_scale"]) for r in rec.rows} == {(6, 1.0), (7, 1.0)}


@pytest.mark.slow
def test_warnings_count_the_steps_of_the_batch_trained(small_corpus, tmp_path, caplog, restore_threads):
    """An epoch-limited run at night trains twice the steps of half-size batches: the warm-up warning counts those."""
    caplog.set_level(logging.INFO, logger="lingmao")
    train, test = small_corpus
    short = (cut_corpus(train, tmp_path / "short.jsonl", 100), test)  # one epoch: 45 steps of 4 windows
    cfg = night_cfg(tmp_path, short, "night.now=23:30", "trainer.max_steps=-1", "trainer.max_epochs=1",
                    "optim.warmup_steps=1000", "trainer.log_every_n_steps=50")
    result = train_mod.train(cfg)
    assert result.global_step > 20
    assert f"more than half of this run's {result.global_step} steps: warming up over {result.global_step // 10} " \
           "steps" in caplog.text


@pytest.mark.slow
def test_the_thread_tuner_keeps_out_of_the_night(small_corpus, tmp_path, monkeypatch, caplog, restore_threads):
    """The thread tuner (hardware.cpu_threads=null) and night mode in one run: the tuner is trying thread
    counts when night mode begins (a new round right after each, recheck_minutes=0), and every night step still
    runs on the night's one thread and half the cores; by day the tuner chooses again, over all the cores."""
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) != 2:
        pytest.skip("written for two cores: one thread by night, one or two by day")
    torch.set_num_threads(2)
    caplog.set_level(logging.INFO, logger="lingmao")
    script_night_clock(monkeypatch, "21:59", "22:00", "07:00")
    cfg = night_cfg(tmp_path, small_corpus, "++trainer.limit_train_batches=5", "trainer.max_epochs=3",
                    "callbacks.thread_tuner.recheck_minutes=0", "callbacks.thread_tuner.steps_per_trial=1",
                    steps=100, tuner=True)
    rec = run_recorded(cfg, monkeypatch)
    threads = rec.per_epoch("threads")
    assert threads[0] == {1, 2}, "by day the tuner tries both counts"
    assert threads[1] == {1} and rec.per_epoch("cpus")[1] == {1}, rec.rows
    assert rec.per_epoch("cpus")[2] == {2} and threads[2] <= {1, 2}
    assert "CPU threads:" in caplog.text  # a round (two trials of a skipped and a timed step) finished by day
