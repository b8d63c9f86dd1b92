"""Shared fixtures: small cuts of the bundled corpus, and a config composed like the app's."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lingmao.config import CONF_DIR, CORPUS_DIR

SAMPLE = CORPUS_DIR / "poetry_sample"


def cut_corpus(src: Path, dest: Path, lines: int) -> Path:
    """Write the first `lines` lines of `src` to `dest` (tests use real text, not invented text)."""
    with open(src, encoding="utf-8") as f:
        dest.write_text("".join(itertools.islice(f, lines)), encoding="utf-8")
    return dest


@pytest.fixture
def small_corpus(tmp_path: Path) -> tuple[Path, Path]:
    """(train, test) JSONL files: 400 and 60 poems of the bundled corpus."""
    return (
        cut_corpus(SAMPLE / "train.jsonl", tmp_path / "train.jsonl", 400),
        cut_corpus(SAMPLE / "test.jsonl", tmp_path / "test.jsonl", 60),
    )


def tiny_overrides(tmp_path: Path, train: Path, test: Path, steps: int = 20) -> list[str]:
    """Overrides for a run that takes seconds on a CPU."""
    return [
        "model=tiny",
        "model.d_model=32",
        "model.dim_feedforward=64",
        "hardware=cpu",
        "hardware.cpu_threads=1",  # fixed: bit-for-bit repeatable (the thread tuner measures otherwise)
        "night=off",
        "data=jsonl",
        f"data.train_file={train}",
        f"data.test_file={test}",
        "data.context_length=32",
        "data.batch_size=8",
        f"paths.output_dir={tmp_path / 'outputs'}",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=10",
        "trainer.limit_val_batches=4",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "optim=adamw",  # rates the tests write out; Muon through the app: test_honest_numbers.py, test_ddp.py
        "optim.warmup_steps=5",
        "show_samples=false",
    ]


@pytest.fixture
def conf_dir() -> Path:
    return CONF_DIR


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_module(module: str, *args: str, timeout: float = 300, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in a session of its own, with its output captured; the whole session is
    killed afterwards, so that a process left waiting (a rank in a collective, a server) never outlives the
    test. A timeout is reported as returncode -9 and a note in stderr, not raised."""
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=cwd, env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(run_module: timed out after {timeout} s)"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class ScriptedClock:
    """Night mode's clock in tests: `times[0]` at the first reading, `times[1]` at the second, ... and then the
    last one for ever (["21:59", "22:00"]: day at the start, night from the first epoch boundary on)."""

    def __init__(self, *times: str) -> None:
        self.times = [dt.time.fromisoformat(t) for t in times]
        self.readings = 0

    def __call__(self) -> dt.time:
        t = self.times[min(self.readings, len(self.times) - 1)]
        self.readings += 1
        return t


def script_night_clock(monkeypatch: pytest.MonkeyPatch, *times: str) -> ScriptedClock:
    """Make the local time that night mode reads (with `night.now` null) follow `times`."""
    clock = ScriptedClock(*times)
    monkeypatch.setattr("lingmao.callbacks.night.local_time", clock)
    return clock
