"""Metrics, progress output, loggers and summary: the FLOP count by hand, and one short real run."""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lingmao.callbacks.monitoring import TrainingMonitor
from lingmao.callbacks.progress import LineProgress, TerminalProgressBar, is_terminal, progress_output
from lingmao.compat import appending_csv_logger
from lingmao.config import compose_config
from lingmao.errors import LingmaoError
from lingmao.loggers import LoggerConfig, build_loggers
from lingmao.model import ModelConfig, build_model
from lingmao.peak_flops import peak_tflops
from lingmao.plot import read_metrics
from lingmao.report import config_tree, format_table
from tests.conftest import run_module
from tests.test_plot import assert_real_png

TRAIN_COLUMNS = {"train/loss", "train/ppl", "lr", "grad_norm", "tokens_per_sec", "samples_per_sec", "session"}
VAL_COLUMNS = {"val/loss", "val/ppl", "val/bpc"}


# ----------------------------------------------------------------------------------------------
# FLOPs, MFU
# ----------------------------------------------------------------------------------------------
def test_flops_per_token_matches_a_hand_count():
    d, layers, ff, vocab, t = 64, 2, 256, 100, 32
    # Forward, per token and layer: Q, K, V projections 3 * 2d^2, output projection 2d^2,
    # scores QK^T 2Td, weighted sum AV 2Td, feed-forward 2 * 2df; then the head 2dV.
    forward = layers * (3 * 2 * d * d + 2 * d * d + 2 * t * d + 2 * t * d + 2 * 2 * d * ff) + 2 * d * vocab
    assert forward == 225_792
    model = build_model(ModelConfig(d_model=d, nhead=2, num_layers=layers, dim_feedforward=ff), vocab)
    # Backward costs twice the forward (gradients for inputs and for weights).
    assert model.flops_per_token(t) == 3 * forward == 677_376


@pytest.mark.parametrize(
    ("name", "precision", "matmul", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", "highest", 989.4),  # SXM
        ("NVIDIA H100 PCIe", "bf16-mixed", "highest", 756.0),
        ("NVIDIA H200", "16-mixed", "highest", 989.4),
        ("NVIDIA H200 NVL", "bf16-true", "highest", 835.5),
        ("NVIDIA A100-SXM4-80GB", "32-true", "high", 156.0),  # float32 matmuls on TF32 tensor cores
        ("NVIDIA A100 80GB PCIe", "32-true", "highest", 19.5),
        ("NVIDIA A10G", "bf16-mixed", "highest", 125.0),
        ("NVIDIA L4", "bf16-mixed", "highest", 121.0),
        ("NVIDIA L40S", "bf16-mixed", "highest", 366.5),
        ("Tesla T4", "bf16-mixed", "highest", None),  # no bfloat16 tensor cores
        ("Tesla V100-SXM2-16GB", "16-mixed", "highest", 125.0),
        ("NVIDIA GeForce GTX 1080", "32-true", "highest", None),  # not in the table
        ("NVIDIA A100-SXM4-80GB", "64-true", "highest", None),
    ],
)
def test_one_dense_peak_table(name, precision, matmul, peak):
    assert peak_tflops(name, precision, matmul) == peak


def test_the_logged_mfu_uses_that_table(monkeypatch, caplog):
    """The monitor on a (stand-in) CUDA device takes its peak from lingmao.peak_flops, or logger.peak_tflops."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), precision="bf16-mixed",
                              global_step=0)
    monitor = TrainingMonitor()
    monitor.on_train_start(trainer, None)
    assert monitor.peak_flops == 989.4e12
    monitor = TrainingMonitor(peak_tflops=500)
    monitor.on_train_start(trainer, None)
    assert monitor.peak_flops == 500e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce GTX 1080")
    monitor = TrainingMonitor()
    with caplog.at_level(logging.INFO, logger="lingmao"):
        monitor.on_train_start(trainer, None)
    assert monitor.peak_flops is None and "GTX 1080 at bf16-mixed is not in lingmao's peak-FLOP table" in caplog.text


# ----------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------
def test_not_a_terminal_means_line_progress(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert not is_terminal()
    cb = progress_output(enabled=True, every_n_steps=7)
    assert isinstance(cb, LineProgress) and cb.every_n_steps == 7
    assert progress_output(enabled=False) is None


def test_terminal_bar_shows_loss_lr_speed_and_eta():
    monitor = TrainingMonitor()
    monitor.latest.update({"loss": 3.21, "lr": 5e-4, "tokens_per_sec": 12345.6, "eta": 3725.0})
    bar = TerminalProgressBar()
    trainer = SimpleNamespace(progress_bar_metrics={"val/loss": 3.5}, loggers=[], callbacks=[monitor])
    assert bar.get_metrics(trainer, None) == {
        "val/loss": 3.5, "loss": "3.210", "lr": "5.00e-04", "tok/s": "12,346", "eta": "1h02m05s"
    }


def test_csv_logger_appends_when_a_run_resumes(tmp_path):
    first = appending_csv_logger(str(tmp_path))
    first.log_metrics({"train/loss": 3.0}, step=9)
    first.save()
    second = appending_csv_logger(str(tmp_path))
    second.log_metrics({"train/loss": 2.0}, step=19)
    second.log_metrics({"val/loss": 2.5}, step=19)  # a new column: the header is rewritten, rows kept
    second.save()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [
        ("9", "3.0", ""), ("19", "2.0", ""), ("19", "", "2.5")
    ]


def test_tensorboard_is_optional():
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(LingmaoError, match=r"pip install tensorboard"):
            build_loggers(LoggerConfig(tensorboard=True), Path("unused"))
    else:
        assert len(build_loggers(LoggerConfig(tensorboard=True), Path("unused"))) == 2


def test_logger_group_composes():
    assert compose_config([]).logger.tensorboard is False
    cfg = compose_config(["logger=tensorboard"])
    assert cfg.logger.tensorboard is True and cfg.logger.plots is True


def test_config_tree_and_table():
    cfg = OmegaConf.create({"model": {"d_model": 64, "nhead": 2}, "seed": 1, "paths": {"a": "x", "b": "${paths.a}/y"}})
    assert config_tree(cfg).splitlines() == [
        "config", "├── model", "│   ├── d_model: 64", "│   └── nhead: 2", "├── seed: 1",
        "└── paths", "    ├── a: x", "    └── b: x/y",
    ]
    table = format_table([("steps", "10"), ("tokens seen", "1,000")], "run summary")
    assert "tokens seen   1,000" in table


# ----------------------------------------------------------------------------------------------
# One short real run (and its resumption)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_run(trained_run):
    """The session's shared run of the app (tests/conftest.py): its output, folder and first metrics."""
    first_rows = list(csv.DictReader(open(trained_run.run_dir / "metrics.csv")))
    return trained_run.proc, trained_run.run_dir, first_rows, trained_run


@pytest.mark.slow
def test_metrics_csv_has_every_column(short_run):
    _, run_dir, rows, _ = short_run
    columns = set(rows[0])
    assert TRAIN_COLUMNS | VAL_COLUMNS <= columns, columns
    train = [r for r in rows if r["train/loss"]]
    assert [int(r["step"]) for r in train] == [5, 10, 15, 20, 25, 30]  # every log_every_n_steps
    for r in train:
        assert all(r[c] for c in TRAIN_COLUMNS), r
        assert float(r["train/ppl"]) == pytest.approx(math.exp(float(r["train/loss"])), rel=1e-4)
        assert float(r["tokens_per_sec"]) == pytest.approx(32 * float(r["samples_per_sec"]), rel=1e-6)
        assert float(r["grad_norm"]) > 0 and 0 < float(r["lr"]) <= 1.0001e-3
    val = [r for r in rows if r["val/loss"]]
    assert len(val) == 3
    for r in val:
        # bits per character = nats per token / ln 2 * tokens per character (a character vocabulary:
        # a little over one token per character, the <bos>/<eos> of each poem)
        ratio = float(r["val/bpc"]) * math.log(2) / float(r["val/loss"])
        assert 1.0 < ratio < 1.2
        assert float(r["val/ppl"]) == pytest.approx(math.exp(float(r["val/loss"])), rel=1e-3)


@pytest.mark.slow
def test_plot_is_a_real_image(short_run):
    _, run_dir, _, _ = short_run
    assert_real_png(run_dir / "plots" / "training.png")


@pytest.mark.slow
def test_output_is_quiet_lines_config_tree_and_summary(short_run):
    proc, run_dir, _, _ = short_run
    out = proc.stdout + proc.stderr
    assert "\r" not in out  # no progress-bar redraws in a log file
    lines = out.splitlines()
    assert len(lines) < 250  # the config tree (about 150 lines) and the summary, no line per step
    progress = [line for line in lines if "lingmao.progress" in line and "| epoch" in line]
    assert [line.split(" - ")[1].split(" |")[0] for line in progress] == [
        "step 10/30 (33%)", "step 20/30 (67%)", "step 30/30 (100%)"
    ]
    assert all("tok/s" in line and "loss" in line and "eta" in line for line in progress)
    assert sum("validation at step" in line and "bpc" in line for line in lines) == 3
    assert "├── model" in out and "│   ├── d_model: 32" in out
    assert OmegaConf.load(run_dir / "config.yaml").model.d_model == 32
    summary = out[out.index("run summary"):]
    for row in (r"steps +30 of 30", r"tokens seen +7,680", "mean tokens/s", "best validation", "checkpoint",
                "export", re.escape(str(run_dir / "metrics.csv"))):
        assert re.search(row, summary), summary
    # The run ends with a sample 五绝 and 七绝 of the model it trained.
    han = "[\u3400-\u9fff]"
    assert re.search(f"a 五绝 from this model.*\n({han}{{5}}，{han}{{5}}。\n){{2}}", out), out[-2000:]
    assert re.search(f"a 七绝 from this model.*\n({han}{{7}}，{han}{{7}}。\n){{2}}", out), out[-2000:]
    # Each is the poem the export gives with the command the line names (the export's training lines included).
    from lingmao import load_model

    seed = OmegaConf.load(run_dir / "config.yaml").seed
    exported = load_model(run_dir / "export")
    assert exported.lines is not None
    for form in ("wujue", "qijue"):
        assert f"form={form} seed={seed}):\n{exported.generate(form=form, seed=seed)[0]}\n" in out, out[-2000:]


@pytest.mark.slow
def test_resumed_run_appends_to_metrics_csv(short_run, tmp_path):
    _, _, first_rows, shared = short_run
    run_dir, args = shared.copy(tmp_path)
    proc = run_module("lingmao.train", *[a for a in args if not a.startswith("trainer.max_steps")],
                      "trainer.max_steps=40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert rows[: len(first_rows)] == first_rows  # the first session's rows are still there
    steps = read_metrics(run_dir).series["train/loss"][0]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
    tokens = np.array(read_metrics(run_dir).series["tokens_per_sec"][1])
    assert (tokens > 0).all()
    out = proc.stdout + proc.stderr
    assert re.search(r"tokens seen +10,240", out)  # counted across both sessions
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 40
