"""GPU memory cap and cache clearing: their logic with the CUDA/MPS calls replaced by recorders."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

import lingmao.train as train_mod
from lingmao.callbacks import CacheCleaner, GPUMemoryCap, build_hardware_callbacks, check_memory_fraction
from lingmao.config import CONF_DIR
from lingmao.errors import LingmaoError
from tests.conftest import tiny_overrides


def fake_trainer(device: str, global_step: int = 0) -> SimpleNamespace:
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), global_step=global_step)


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


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.01, 2, True, "half"])
def test_memory_fraction_outside_0_1_is_a_config_error(value):
    with pytest.raises(LingmaoError, match=r"hardware\.gpu_memory_fraction: must be null \(no cap\) or a number"):
        check_memory_fraction(value)


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


@pytest.mark.parametrize("value", [-1, 1.5, True, "often"])
def test_bad_cache_interval_is_a_config_error(value):
    with pytest.raises(LingmaoError, match=r"hardware\.empty_cache_every_n_steps: must be an integer >= 0"):
        CacheCleaner(value)


def compose_train(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_callbacks_only_where_configured():
    assert build_hardware_callbacks(compose_train("hardware=cpu").hardware) == []  # off: no per-step hook
    cbs = build_hardware_callbacks(
        compose_train("hardware.gpu_memory_fraction=0.25", "hardware.empty_cache_every_n_steps=50").hardware
    )
    assert [type(c) for c in cbs] == [GPUMemoryCap, CacheCleaner]
    assert cbs[0].fraction == 0.25 and cbs[1].every_n_steps == 50


def test_real_cpu_run_with_both_set(small_corpus, tmp_path, caplog, cuda_calls, monkeypatch):
    """On CPU both settings are accepted, say once that they do not apply, and call nothing."""
    caplog.set_level(logging.INFO, logger="lingmao")
    built = []
    build = train_mod.build_callbacks
    monkeypatch.setattr(train_mod, "build_callbacks", lambda c, d: built.extend(build(c, d)) or built)
    train, test = small_corpus
    cfg = compose_train(
        *tiny_overrides(tmp_path, train, test, steps=4), "hardware.gpu_memory_fraction=0.5",
        "hardware.empty_cache_every_n_steps=1", "run_test=false", "export=false", "trainer.limit_val_batches=0",
    )
    train_mod.train(cfg)
    assert [c for c in cuda_calls if c[0] == "cap"] == []  # (Lightning itself calls cuda.empty_cache on resume)
    cleaner = next(c for c in built if isinstance(c, CacheCleaner))
    assert cleaner.device_type == "cpu" and cleaner.calls == 0
    assert "hardware.gpu_memory_fraction=0.5 does not apply on cpu" in caplog.text
    assert "hardware.empty_cache_every_n_steps: nothing to free on cpu" in caplog.text


def test_bad_fraction_stops_the_run(small_corpus, tmp_path):
    train, test = small_corpus
    cfg = compose_train(*tiny_overrides(tmp_path, train, test), "hardware.gpu_memory_fraction=1.5")
    with pytest.raises(LingmaoError, match="hardware.gpu_memory_fraction"):
        train_mod.train(cfg)
