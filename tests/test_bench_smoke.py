"""The benchmark scripts run end to end (tiny sizes, a couple of steps) and print their figures."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import SAMPLE, cut_corpus

pytestmark = pytest.mark.slow

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


TINY_TRAIN = ["--model", "tiny", "--data", "jsonl", "--batch", "2", "--context", "16", "--steps", "2", "--repeat", "2",
              "--set", "model.d_model=16", "model.num_layers=1", "model.dim_feedforward=32", "optim.warmup_steps=1"]


def test_bench_train_prints_ratio(cut: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lingmao (the app's train()) against the plain GPT: both sides train on the same batches, and the figures
    printed are the ones the clocks measured."""
    bench = load_script("bench_train")
    argv = [*TINY_TRAIN, "--train-file", str(cut), "--warmup", "1", "--threads", "1",
            "--output-dir", str(tmp_path / "out")]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    match = re.search(r"RATIO lingmao/plain: median (\d+\.\d+) \(min (\d+\.\d+), max (\d+\.\d+)\) over 2", out)
    assert match, out
    repeats = [float(r) for r in re.findall(r"repeat \d/2 .*ratio (\d+\.\d+)", out)]
    assert len(repeats) == 2 and float(match[2]) == min(repeats) and float(match[3]) == max(repeats), out
    assert "same batches on both sides: yes" in out, out  # the same token ids through both loops
    rows = re.findall(r"\| (lingmao|plain) \| [\d,]+ .*\| (\d+\.\d+) \| [\d,.]+ \|", out)
    assert [side for side, _ in rows] == ["lingmao", "plain"], out
    assert all(5.0 < float(loss) < 9.0 for _, loss in rows), out  # near ln(vocabulary) after two steps: trained
    # lingmao's run went through the app: its run directory holds the config and the final checkpoint.
    assert (tmp_path / "out" / "runs" / "lingmao-0" / "checkpoints" / "last.ckpt").is_file()


def test_bench_train_neighbour_mode(cut: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default thread setting against each fixed count beside a busy process; the neighbour is stopped."""
    bench = load_script("bench_train")
    argv = [*TINY_TRAIN, "--train-file", str(cut), "--neighbour", "--repeat", "1",
            "--output-dir", str(tmp_path / "out")]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    cores = bench.usable_cores()
    for name in ["default", *(f"threads={n}" for n in range(1, cores + 1))]:
        assert re.search(rf"\| {name} \| [\d,]+ \(", out), out
    assert re.search(r"RATIO default / best fixed: median \d+\.\d+ .* over 1 interleaved", out), out
    assert re.search(r"threads=1 [\d,]+ tok/s \(threads per step 1x2\)", out), out  # fixed: every step at 1
    pid = int(re.search(r"neighbour process \(pid (\d+)", out)[1])
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped


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
