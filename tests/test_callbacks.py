"""GPU memory cap and cache clearing: their logic with the CUDA/MPS calls replaced by recorders."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

import lingmao.train as train_mod
from lingmao.callbacks import instantiate_callbacks
from lingmao.callbacks.memory import CacheCleaner, GPUMemoryCap
from lingmao.config import CONF_DIR, compose_config, validate
from lingmao.errors import LingmaoError
from tests.conftest import tiny_overrides


def fake_trainer(device: str, global_step: int = 0) -> SimpleNamespace:
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), global_step=global_step,
                           world_size=1)


@pytest.fixture
def cuda_calls(monkeypatch) -> list[tuple]:
    calls: list[tuple] = []
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda f, device=None: calls.append(("cap", f, device))
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("cuda.empty_cache",)))
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: calls.append(("mps.empty_cache",)))
    return calls


@pytest.mark.parametrize("value", ["0", "0.0", "-0.5", "1.01", "2", "true", "half"])
def test_memory_fraction_outside_0_1_is_a_config_error(value):
    with pytest.raises(LingmaoError, match=r"hardware\.gpu_memory_fraction=.*allowed: null or a number in \(0, 1\]"):
        validate(compose_config([f"hardware.gpu_memory_fraction={value}"]))


def test_memory_cap_on_cuda(cuda_calls, caplog):
    caplog.set_level(logging.INFO, logger="lingmao")
    cap = GPUMemoryCap(0.5)
    cap.setup(fake_trainer("cuda:1"), None, "fit")
    cap.setup(fake_trainer("cuda:1"), None, "test")  # once per device, not per stage
    assert cuda_calls == [("cap", 0.5, 1)]
    GPUMemoryCap(1).setup(fake_trainer("cuda"), None, "fit")  # no index: the current device
    assert cuda_calls[-1] == ("cap", 1.0, 0)
    assert "GPU memory cap: 50% of cuda:1" in caplog.text


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_memory_cap_elsewhere_is_one_info_line(device, cuda_calls, caplog):
    caplog.set_level(logging.INFO, logger="lingmao")
    cap = GPUMemoryCap(0.5)
    cap.setup(fake_trainer(device), None, "fit")
    cap.setup(fake_trainer(device), None, "test")
    assert cuda_calls == []
    assert caplog.text.count(f"hardware.gpu_memory_fraction=0.5 does not apply on {device}") == 1


def test_no_cap_means_no_call(cuda_calls):
    GPUMemoryCap(None).setup(fake_trainer("cuda:0"), None, "fit")
    assert cuda_calls == []


@pytest.mark.parametrize(("device", "call"), [("cuda:0", "cuda.empty_cache"), ("mps", "mps.empty_cache")])
def test_cache_cleared_every_n_optimizer_steps(device, call, cuda_calls):
    cleaner = CacheCleaner(3)
    trainer = fake_trainer(device)
    cleaner.setup(trainer, None, "fit")
    # With accumulation 2 the hook sees every optimizer step twice.
    seen = []
    for step in [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7]:
        trainer.global_step = step
        before = len(cuda_calls)
        cleaner.on_train_batch_end(trainer, None, None, None, 0)
        if len(cuda_calls) > before:
            seen.append(step)
    assert seen == [3, 6]
    assert cuda_calls == [(call,), (call,)]


def test_cache_cleaner_is_a_no_op_on_cpu(cuda_calls):
    cleaner = CacheCleaner(1)
    trainer = fake_trainer("cpu")
    cleaner.setup(trainer, None, "fit")
    for step in range(5):
        trainer.global_step = step
        cleaner.on_train_batch_end(trainer, None, None, None, 0)
    assert cuda_calls == [] and cleaner.calls == 0


@pytest.mark.parametrize("value", ["-1", "1.5", "true", "often"])
def test_bad_cache_interval_is_a_config_error(value):
    with pytest.raises(LingmaoError, match=r"hardware\.empty_cache_every_n_steps=.*allowed: an integer >= 0"):
        validate(compose_config([f"hardware.empty_cache_every_n_steps={value}"]))


def test_memory_callbacks_take_the_hardware_settings():
    cfg = compose_config(["hardware.gpu_memory_fraction=0.25", "hardware.empty_cache_every_n_steps=50"])
    cbs = instantiate_callbacks(cfg.callbacks)
    cap = next(c for c in cbs if isinstance(c, GPUMemoryCap))
    cleaner = next(c for c in cbs if isinstance(c, CacheCleaner))
    assert cap.fraction == 0.25 and cleaner.every_n_steps == 50


def test_every_default_callback_is_built_from_its_yaml_file():
    """conf/callbacks/default.yaml lists every file of the folder, and each entry builds one callback."""
    cfg = compose_config([])
    files = {p.stem for p in (CONF_DIR / "callbacks").glob("*.yaml")} - {"default"}
    listed = set(OmegaConf.load(CONF_DIR / "callbacks" / "default.yaml").defaults) - {"_self_"}
    assert listed == files
    built = instantiate_callbacks(cfg.callbacks)
    assert len(built) == len(cfg.callbacks) - (not is_terminal_progress(cfg))


def is_terminal_progress(cfg) -> bool:
    """Whether the progress entry builds a callback here (a bar on a terminal, lines in logs: both do)."""
    return bool(cfg.trainer.enable_progress_bar)


def test_a_callback_added_by_a_yaml_file_alone_is_built(tmp_path):
    """A new callback is a class and a YAML file in a config folder: no edit to train.py or a schema."""
    from hydra import compose, initialize_config_dir

    conf = tmp_path / "conf"
    (conf / "callbacks").mkdir(parents=True)
    (conf / "callbacks" / "step_counter.yaml").write_text(
        "step_counter:\n  _target_: tests.test_callbacks.StepCounter\n  every: 7\n"
    )
    (conf / "extra.yaml").write_text("defaults:\n  - train\n  - _self_\n")
    with initialize_config_dir(str(conf), version_base="1.3"):
        # The project's own conf/ on the search path too, so `train` and its groups are found.
        cfg = compose("extra", overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", "callbacks=[default,step_counter]"])
    built = instantiate_callbacks(cfg.callbacks)
    counters = [c for c in built if isinstance(c, StepCounter)]
    assert len(counters) == 1 and counters[0].every == 7
    assert any(isinstance(c, GPUMemoryCap) for c in built)  # the defaults are still there


class StepCounter(L.Callback):
    def __init__(self, every: int) -> None:
        self.every = every


@pytest.mark.slow
def test_real_cpu_run_with_both_set(small_corpus, tmp_path, caplog, cuda_calls, monkeypatch):
    """On CPU both settings are accepted, say once that they do not apply, and call nothing."""
    caplog.set_level(logging.INFO, logger="lingmao")
    built = []
    build = train_mod.instantiate_callbacks
    monkeypatch.setattr(train_mod, "instantiate_callbacks", lambda c: built.extend(build(c)) or built)
    train, test = small_corpus
    cfg = compose_config([
        *tiny_overrides(tmp_path, train, test, steps=4), "hardware.gpu_memory_fraction=0.5",
        "hardware.empty_cache_every_n_steps=1", "run_test=false", "export=false", "trainer.limit_val_batches=0",
    ])
    train_mod.train(cfg)
    assert [c for c in cuda_calls if c[0] == "cap"] == []  # (Lightning itself calls cuda.empty_cache on resume)
    cleaner = next(c for c in built if isinstance(c, CacheCleaner))
    assert cleaner.device_type == "cpu" and cleaner.calls == 0
    assert "hardware.gpu_memory_fraction=0.5 does not apply on cpu" in caplog.text
    assert "hardware.empty_cache_every_n_steps: nothing to free on cpu" in caplog.text


def test_bad_fraction_stops_the_run(small_corpus, tmp_path):
    train, test = small_corpus
    cfg = compose_config([*tiny_overrides(tmp_path, train, test), "hardware.gpu_memory_fraction=1.5"])
    with pytest.raises(LingmaoError, match="hardware.gpu_memory_fraction"):
        train_mod.train(cfg)


def test_thread_tuner_keeps_the_fastest_count_and_measures_again(monkeypatch):
    """Steps timed on a clock where one thread is faster (a busy neighbour): the tuner settles on one thread,
    and after `recheck_minutes` measures again and follows the machine back to two."""
    from lingmao.callbacks import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "cpu_sample", lambda: None)  # no look at the machine: all cores first
    set_to: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: set_to.append(n))
    clock = {"now": 0.0, "cost": {2: 4.0, 1: 1.0}}
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    tuner = threads.ThreadTuner(fixed=None, steps_per_trial=3, recheck_minutes=1)
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), global_step=0, callbacks=[],
                              world_size=1)
    tuner.setup(trainer, None, "fit")
    tuner.on_train_start(trainer, None)

    def step() -> None:
        threads_now = set_to[-1] if set_to else 2
        clock["now"] += clock["cost"][threads_now]
        trainer.global_step += 1
        tuner.on_train_batch_end(trainer, None)

    for _ in range(10):
        step()
    assert tuner.chosen == 1 and set_to[-1] == 1
    assert tuner.history[0] == {2: 4.0, 1: 1.0}
    clock["cost"] = {2: 0.5, 1: 1.0}  # the neighbour has gone
    for _ in range(80):
        step()
    assert tuner.chosen == 2 and len(tuner.history) >= 2 and tuner.history[-1] == {2: 0.5, 1: 1.0}


def test_thread_tuner_tries_the_free_cores_first_and_gives_up_on_a_slow_count(monkeypatch):
    """One of two cores busy: the round starts at one thread, and two threads cost a single step (four times
    slower, past the give-up factor) instead of a whole trial."""
    from lingmao.callbacks import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "free_cores", lambda before, after, cores: 1)
    set_to: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: set_to.append(n))
    clock = {"now": 0.0, "cost": {2: 4.0, 1: 1.0}}
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    tuner = threads.ThreadTuner(fixed=None, steps_per_trial=3, recheck_minutes=10, give_up_factor=1.5)
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), global_step=0, callbacks=[],
                              world_size=1)
    tuner.setup(trainer, None, "fit")
    tuner.on_train_start(trainer, None)
    ran: list[int] = []
    for _ in range(10):
        ran.append(set_to[-1])
        clock["now"] += clock["cost"][set_to[-1]]
        trainer.global_step += 1
        tuner.on_train_batch_end(trainer, None)
    assert ran == [1, 1, 1, 1, 2, 1, 1, 1, 1, 1]  # a trial of 1 (one step not counted, three counted), one step of 2
    assert tuner.chosen == 1 and tuner.history == [{1: 1.0, 2: 4.0}]


def test_free_cores_from_cpu_samples():
    """(time, busy CPU-seconds of the cores, this process's CPU-seconds): others' share is rounded off."""
    from lingmao.callbacks.threads import free_cores

    assert free_cores((0.0, 10.0, 5.0), (2.0, 12.0, 5.0), 2) == 1  # others used one core, this process slept
    assert free_cores((0.0, 10.0, 5.0), (1.0, 11.4, 5.8), 2) == 1  # others 0.6 core
    assert free_cores((0.0, 10.0, 5.0), (1.0, 11.0, 5.8), 2) == 2  # others 0.2 core
    assert free_cores((0.0, 10.0, 5.0), (1.0, 14.0, 5.0), 2) == 1  # at least one
    assert free_cores(None, (1.0, 14.0, 5.0), 2) is None
    from lingmao.callbacks.threads import cpu_sample

    sample = cpu_sample()
    if sample is not None:  # Linux: real readings, monotonic
        later = cpu_sample()
        assert later[0] >= sample[0] and later[1] >= sample[1] and later[2] >= sample[2]


def test_thread_tuner_stays_out_of_a_fixed_count():
    from lingmao.callbacks.threads import ThreadTuner

    tuner = ThreadTuner(fixed=2)
    tuner.setup(fake_trainer("cpu"), None, "fit")
    assert not tuner.active
    cfg = compose_config(["hardware.cpu_threads=1"])
    built = next(c for c in instantiate_callbacks(cfg.callbacks) if isinstance(c, ThreadTuner))
    assert built.fixed == 1


DEFAULT_CALLBACKS = sorted(compose_config([]).callbacks)


@pytest.mark.slow
@pytest.mark.parametrize("name", DEFAULT_CALLBACKS)
def test_every_default_callback_can_be_removed(name, small_corpus, tmp_path):
    """`~callbacks.NAME` (docs/configuration.md) for each entry of conf/callbacks/default.yaml: the run trains,
    validates at its end, tests, exports and says so, without it."""
    train, test = small_corpus
    overrides = [*tiny_overrides(tmp_path, train, test, steps=4), "trainer.val_check_interval=3",
                 "trainer.limit_test_batches=2", "logger.plots=false", "night=default", "night.now=23:30",
                 f"~callbacks.{name}"]
    cfg = compose_config(overrides)
    assert name not in cfg.callbacks
    threads = torch.get_num_threads()
    try:
        result = train_mod.train(cfg)
    finally:
        torch.set_num_threads(threads)
    assert result.global_step == 4 and result.last_val_loss is not None and result.test is not None
    assert (result.export_dir / "model.safetensors").is_file()
    assert (result.run_dir / "finished.json").is_file()


def test_thread_tuner_takes_rank_zeros_count_with_several_processes(monkeypatch):
    """Several processes: no tuning, and every rank sets the count rank 0 broadcasts (hardware.cpu_threads when
    set, whatever the launcher chose meanwhile)."""
    from lingmao.callbacks.threads import ThreadTuner

    set_to: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: set_to.append(n))
    sent: list[int] = []
    rank0 = SimpleNamespace(root_device=torch.device("cpu"), broadcast=lambda value, src: sent.append(value) or 3)
    trainer = SimpleNamespace(strategy=rank0, world_size=2, is_global_zero=False, global_step=0, callbacks=[])
    tuner = ThreadTuner(fixed=None)
    tuner.setup(trainer, None, "fit")
    assert not tuner.active and set_to == [3] and tuner.chosen == 3 and sent == [torch.get_num_threads()]
    fixed = ThreadTuner(fixed=2)
    fixed.setup(trainer, None, "fit")
    assert not fixed.active and set_to == [3, 2]
