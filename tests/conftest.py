"""Shared test parts: small cuts of the bundled corpus, overrides for tiny runs, the one way to start the apps in
a subprocess, the one builder of tiny models, and the expensive things built once per session (a tiny run of
the app, a tiny export, a tiny model trained on verse) for the tests that only read them.

`python -m pytest -q -m "not slow"` leaves out every test marked `slow`: those that start the apps in
subprocesses, several processes, or train for more than a moment.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch

from lingmao.config import CONF_DIR, CORPUS_DIR
from lingmao.verse.forms import FORMS

SAMPLE = CORPUS_DIR / "poetry_sample"
ROOT = Path(__file__).resolve().parent.parent
# Verse forms as test parameters: the 4-line forms in the fast subset, the 8-line ones (twice the sampling) slow.
FORMS_FAST_FIRST = [f if FORMS[f][1] == 4 else pytest.param(f, marks=pytest.mark.slow) for f in FORMS]


# ----------------------------------------------------------------------------------------------
# Corpus cuts and tiny runs
# ----------------------------------------------------------------------------------------------
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


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, above all on a busy machine; tests that need more set them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# The apps in subprocesses
# ----------------------------------------------------------------------------------------------
def start_module(module: str, *args: str, cwd: Path | None = None, env: dict[str, str | None] | None = None,
                 stdout: int | None = subprocess.PIPE) -> subprocess.Popen:
    """Start `python -m <module> <args>` in a session of its own (so `kill_session` ends it and its children),
    text mode, stdout and stderr piped. `module="-c"` runs the code in `args[0]` instead. `env` changes this
    process's environment for it (None removes a variable)."""
    cmd = [sys.executable, "-c", *args] if module == "-c" else [sys.executable, "-m", module, *args]
    environ = {**os.environ, **(env or {})}
    return subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=cwd, env={k: v for k, v in environ.items() if v is not None})


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of `proc`'s session (a rank left waiting in a collective, a server's children)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_module(module: str, *args: str, timeout: float = 300, cwd: Path | None = None,
               env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` (or `run_module("-c", code)`) to its end, output captured; the whole session
    is killed afterwards, so that nothing it started outlives the test. A timeout is reported as returncode -9
    and a note at the end of stderr, not raised."""
    proc = start_module(module, *args, cwd=cwd, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        out, err = proc.communicate()
        err += f"\n(run_module: timed out after {timeout} s)"
    finally:
        kill_session(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_modules(commands: dict[str, tuple[str, ...]], timeout: float = 300,
                cwd: dict[str, Path] | Path | None = None) -> dict[str, subprocess.CompletedProcess]:
    """Several `run_module(module, *args)` at once, by name (`{name: (module, *args)}`; `cwd` one folder or one
    per name): a short run of an app is mostly its start-up, which overlaps."""
    from concurrent.futures import ThreadPoolExecutor

    def run(name: str) -> subprocess.CompletedProcess:
        module, *args = commands[name]
        return run_module(module, *args, timeout=timeout, cwd=cwd.get(name) if isinstance(cwd, dict) else cwd)

    with ThreadPoolExecutor(len(commands)) as pool:
        return dict(zip(commands, pool.map(run, commands), strict=True))


# ----------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------
UNTRAINED_SIZE = dict(d_model=32, nhead=2, num_layers=1, dim_feedforward=64, dropout=0.0, max_len=128)
TRAINED_SIZE = dict(d_model=64, nhead=2, num_layers=2, dim_feedforward=128, dropout=0.0, max_len=128)


def tiny_model(arch: str = "gpt", texts: list[str] | None = None, steps: int = 0, min_frequency: int = 1,
               seed: int = 0, context_length: int = 64, **data_cfg):
    """A `LingmaoModel` small enough for a test: a character tokenizer of `texts` (default: the first 300 poems
    of the bundled sample), and a model of `arch` that is untrained (`steps=0`, one layer of width 32) or trained
    `steps` steps with a plain torch loop on those texts (two layers of width 64, so its verse reads like verse).
    `data_cfg`: the data settings the model records (template, convert, ...)."""
    from lingmao.data import iter_documents
    from lingmao.data.tokenizer import special_ids, train_tokenizer
    from lingmao.export import LingmaoModel
    from lingmao.model import ModelConfig, build_model

    if texts is None:
        texts = list(itertools.islice(iter_documents(SAMPLE / "train.jsonl"), 300))
    tok = train_tokenizer(texts, min_frequency=min_frequency)
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, **(TRAINED_SIZE if steps else UNTRAINED_SIZE))
    model = build_model(cfg, tok.get_vocab_size())
    if steps:
        ids = special_ids(tok)
        stream = torch.tensor(
            [i for t in texts for i in [ids["bos"], *tok.encode(t, add_special_tokens=False).ids, ids["eos"]]]
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        window, batch = 64, 16
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, len(stream) - window - 1, (batch,))
            x = torch.stack([stream[s : s + window] for s in starts])
            y = torch.stack([stream[s + 1 : s + window + 1] for s in starts])
            loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, model.vocab_size), y.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    data = {"context_length": context_length, "text_key": "text", "template": None, "convert": "none", **data_cfg}
    return LingmaoModel(model, tok, {"vocab_size": tok.get_vocab_size(), "model": dataclasses.asdict(cfg),
                                     "data": data})


def tiny_export(directory: Path, **kwargs) -> Path:
    """`tiny_model(**kwargs)` exported to `directory`."""
    from lingmao.export import export_model

    lm = tiny_model(**kwargs)
    return export_model(directory, lm.model, lm.tokenizer, lm.config["model"], lm.config["data"])


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """An untrained tiny gpt export (tokenizer of 300 poems, context length 64), for tests that only read it."""
    return tiny_export(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def lm(model_dir):
    """`model_dir` loaded (a test module may give `lm` another model, as test_verse_generate.py does)."""
    from lingmao.export import load_model

    return load_model(model_dir)


@pytest.fixture(scope="session")
def verse_lm():
    """A tiny model trained 40 steps on every 4th poem of the bundled sample (Tang shi and Song ci): its
    constrained samples read like verse. Characters seen fewer than 5 times are left out of the vocabulary and
    it sees the last 24 tokens when sampling, which keeps 100-sample batches cheap on a CPU; the constraints
    are the same."""
    from lingmao.data import iter_documents

    texts = list(itertools.islice(iter_documents(SAMPLE / "train.jsonl"), 0, None, 4))
    return tiny_model(texts=texts, steps=40, min_frequency=5, context_length=24)


# ----------------------------------------------------------------------------------------------
# One tiny run of the app, shared
# ----------------------------------------------------------------------------------------------
class AppRun:
    """A finished `python -m lingmao.train` run: its command-line overrides, output and folders."""

    def __init__(self, tmp: Path, args: list[str], proc: subprocess.CompletedProcess) -> None:
        self.tmp, self.args, self.proc = tmp, args, proc
        self.run_dir = tmp / "outputs" / "runs" / "shared"
        self.export_dir = self.run_dir / "export"
        self.output = proc.stdout + proc.stderr

    def copy(self, dest: Path) -> tuple[Path, list[str]]:
        """A copy of the run's outputs under `dest` and the overrides that continue it there (for tests that
        change the run: the shared one stays as it is)."""
        shutil.copytree(self.tmp / "outputs", dest / "outputs")
        old = f"paths.output_dir={self.tmp / 'outputs'}"
        return dest / "outputs" / "runs" / "shared", [
            f"paths.output_dir={dest / 'outputs'}" if a == old else a for a in self.args
        ]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> AppRun:
    """30 steps of the app on 400 poems (progress lines every 10 steps, metrics every 5, validation every 10,
    the test, the export, the sample poems at the end), run once for every test that reads it."""
    tmp = tmp_path_factory.mktemp("app-run")
    train = cut_corpus(SAMPLE / "train.jsonl", tmp / "train.jsonl", 400)
    test = cut_corpus(SAMPLE / "test.jsonl", tmp / "test.jsonl", 60)
    args = [
        *tiny_overrides(tmp, train, test, steps=30), "run_name=shared", "trainer.log_every_n_steps=5",
        "trainer.enable_progress_bar=true", "logger.progress_every_n_steps=10", "show_samples=true",
    ]
    proc = run_module("lingmao.train", *args, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return AppRun(tmp, args, proc)


# ----------------------------------------------------------------------------------------------
# Training in this process
# ----------------------------------------------------------------------------------------------
class SignalAt(L.Callback):
    """Sends this process `signum` at the end of optimizer step `step`: a user's Ctrl-C or `kill` at a known
    moment. Put it before the app's callbacks (`train_with`'s default) and the run stops at that very step."""

    def __init__(self, step: int | None, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            self.step = None
            os.kill(os.getpid(), self.signum)


def train_with(monkeypatch: pytest.MonkeyPatch, cfg, *callbacks: L.Callback, first: bool = True):
    """`lingmao.train.train(cfg)` in this process, with `callbacks` added to those of the config (before them,
    so they see each step first, or after them with `first=False`); returns the run's TrainResult."""
    import lingmao.train as train_mod

    build = train_mod.instantiate_callbacks
    monkeypatch.setattr(train_mod, "instantiate_callbacks",
                        lambda c: [*callbacks, *build(c)] if first else [*build(c), *callbacks])
    return train_mod.train(cfg)


# ----------------------------------------------------------------------------------------------
# Night mode's clock
# ----------------------------------------------------------------------------------------------
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


@pytest.fixture(autouse=True)
def keep_log_levels():
    """Benchmark scripts run in-process quiet the libraries' and lingmao's loggers for their own output: every test
    gives the next one the levels it found."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "lingmao")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
