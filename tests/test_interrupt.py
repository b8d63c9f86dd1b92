"""Ctrl-C and SIGTERM on a real `python -m lingmao.train`: a checkpoint of the current step, exit 130 / 143,
no export, and the same command continues from the saved step."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import kill_session, run_module, start_module, tiny_overrides

pytestmark = pytest.mark.slow


def start(tmp_path: Path, corpus, *extra: str) -> subprocess.Popen:
    train, test = corpus
    args = [
        *tiny_overrides(tmp_path, train, test, steps=100_000), "run_name=sig", "checkpoint_every_n_steps=2",
        "trainer.val_check_interval=50", "run_test=false", f"model_save_dir={tmp_path / 'export'}", *extra,
    ]
    return start_module("lingmao.train", *args, cwd=tmp_path)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if proc.poll() is not None:
            pytest.fail(f"training ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            kill_session(proc)
            pytest.fail("no checkpoint appeared")
        time.sleep(0.05)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_exits_and_the_same_command_resumes(tmp_path, small_corpus, signum, code):
    last = tmp_path / "outputs" / "runs" / "sig" / "checkpoints" / "last.ckpt"
    proc = start(tmp_path, small_corpus)
    wait_for(last, proc)
    time.sleep(0.3)
    proc.send_signal(signum)
    if signum == signal.SIGINT:  # a second Ctrl-C while saving only prints a note
        time.sleep(0.02)
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    name = signal.Signals(signum).name
    assert f"interrupted by {name}: saved step" in err and str(last) in err, err[-2000:]
    assert "run the same command again" in err
    step = int(err.split(": saved step ")[1].split()[0])
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == step
    assert not (tmp_path / "export").exists(), "an interrupted run must not export"
    assert not list(last.parent.glob(".*.tmp"))

    if signum == signal.SIGTERM:
        return  # resuming is the same for both signals; once is enough
    proc = run_module(
        "lingmao.train", *tiny_overrides(tmp_path, *small_corpus, steps=step + 3), "run_name=sig",
        "checkpoint_every_n_steps=2", "trainer.val_check_interval=50", "run_test=false",
        f"model_save_dir={tmp_path / 'export'}", timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stderr + proc.stdout
    assert f"resuming from {last}: epoch" in out and f"step {step}" in out, out[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == step + 3
    assert (tmp_path / "export" / "model.safetensors").is_file()
