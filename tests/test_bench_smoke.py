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


def test_bench_overnight_compares_sizes_at_equal_times(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two run folders (metrics.csv and config.yaml as a night run writes them) with known curves: the table gives
    each size's loss at equal minutes of training (a step's time at the run's median throughput) and the power law
    fitted to each curve, read at the steps nine hours give."""
    bench = load_script("bench_overnight")
    curves = {"size-4x256": (2048.0, 2.0, 40.0, 0.5), "size-6x384": (1024.0, 1.5, 60.0, 0.5)}  # tok/s, a, b, c
    for name, (speed, a, b, c) in curves.items():
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text("data:\n  batch_size: 16\n  context_length: 256\n"
                                         "night:\n  batch_size_factor: 0.5\noptim:\n  accumulation_steps: 1\n")
        lines = ["step,train/loss,tokens_per_sec,night"]
        lines += [f"{s},{a + b * s**-c},{speed if s % 100 else speed / 2},1" for s in range(10, 2410, 10)]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    assert bench.main(["--runs", *(str(tmp_path / n) for n in curves)]) == 0
    out = capsys.readouterr().out
    header, small, medium = out.splitlines()[:3]
    assert header.split()[3:7] == ["10", "min", "20", "min"], out
    # 2,048 tokens a step: size-4x256 makes a step a second, size-6x384 one every 2 s (the medians, not the dips).
    small_cells, medium_cells = small.split(), medium.split()
    assert small_cells[1:3] == ["2400", "2048"] and medium_cells[1:3] == ["2400", "1024"], out
    # At 10 minutes: steps 301..600 for the first, 151..300 for the second: the mean of their curves there.
    expect = [sum(2.0 + 40.0 * s**-0.5 for s in range(310, 601, 10)) / 30,
              sum(1.5 + 60.0 * s**-0.5 for s in range(160, 301, 10)) / 15]
    assert float(small_cells[3]) == pytest.approx(expect[0], abs=1e-3), out
    assert float(medium_cells[3]) == pytest.approx(expect[1], abs=1e-3), out
    # The night: 9 h at the median speed, and the fitted curve there is the true one (the curves are exact).
    assert small_cells[-2] == "32,400" and medium_cells[-2] == "16,200", out
    assert float(small_cells[-1]) == pytest.approx(2.0 + 40.0 * 32_400**-0.5, abs=0.02), out
    assert float(medium_cells[-1]) == pytest.approx(1.5 + 60.0 * 16_200**-0.5, abs=0.02), out
