"""The benchmark scripts run end to end (tiny sizes, a couple of steps) and print their figures."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import SAMPLE, cut_corpus

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cut(tmp_path: Path) -> Path:
    return cut_corpus(SAMPLE / "train.jsonl", tmp_path / "train.jsonl", 150)


def test_bench_train_prints_ratio(cut: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("bench_train")
    argv = [
        "--model", "tiny", "--data", "jsonl", "--train-file", str(cut), "--batch", "2", "--context", "16",
        "--steps", "2", "--warmup", "1", "--repeat", "2", "--threads", "1", "--output-dir", str(tmp_path / "out"),
        "--set", "model.d_model=16", "model.num_layers=1", "model.dim_feedforward=32", "optim.warmup_steps=1",
    ]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"RATIO lingmao/plain: median \d+\.\d+ \(min \d+\.\d+, max \d+\.\d+\) over 2", out), out
    assert "scaled_dot_product_attention" in out  # the attention ops, read from the profiler
    # Both sides trained the same model on the same batches: the same losses.
    losses = re.findall(r"mean train loss (\d+\.\d+)", out)
    assert len(losses) == 2 and losses[0] == losses[1], out


def test_bench_data_loader_prints_figures(cut: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("bench_data")
    argv = [
        "loader", "--train-file", str(cut), "--context", "16", "--strides", "1,16", "--cut-kb", "5", "--opens", "1",
        "--stall-steps", "2", "--stall-warmup", "1",
        "--set", "model.d_model=16", "model.num_layers=1", "model.dim_feedforward=32", "data.batch_size=2",
        "data.context_length=16",
    ]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"\d+\.\d+ MB/s of JSONL", out), out
    assert re.search(r"open the cached dataset .*: median \d+\.\d+ s", out), out
    assert len(re.findall(r"lingmao  stride .*: -?\d+\.\d+ B/token", out)) == 4, out
    assert len(re.findall(r"design's approach stride .*: [\d,]+\.\d+ B/token", out)) == 2, out
    assert re.search(r"\d+\.\d+% of training time", out), out


def test_bench_data_scale_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The steps of `scale` on a 1 MB corpus: both paths give the same tokens; one step in a child process, which
    reports its peak memory (the others in this process: each child imports torch, which takes seconds)."""
    bench = load_script("bench_data")
    corpus = tmp_path / "corpus.jsonl"
    size = bench.synthetic_corpus(corpus, 1)
    assert 1_000_000 <= size < 1_001_000 and corpus.read_bytes().count(b"\n") > 3000
    tok = str(tmp_path / "tok.json")
    ours = bench.task_lingmao([str(corpus)], str(tmp_path / "cache"), tok)
    library = bench.task_hf(str(corpus), tok)
    assert ours["tokens"] == library["tokens"] > 200_000
    opened = bench.child("open", files=[str(corpus)], cache_dir=str(tmp_path / "cache"), tokenizer=tok, opens=1)
    assert opened["tokens"] == ours["tokens"] and 50 < opened["peak_rss_mb"] < 4000
    assert opened["peak_rss_mb"] >= opened["rss_before_mb"] > 0
    bench.print_rows([("1 MB", "lingmao", size, {**ours, "peak_rss_mb": 1.0}, ""),
                      ("1 MB", "library", size, {**library, "peak_rss_mb": 1.0}, "extrapolated"),
                      ("1 MB", "open", size, opened, "")])
    out = capsys.readouterr().out
    assert len(re.findall(r"[\d.]+ MB/s wall, +[\d.]+ MB/s CPU .*peak RSS 1 MB", out)) == 2, out
    assert re.search(r"open +open \d+\.\d+ s \(median of 1\).*peak RSS [\d,]+ MB", out), out
