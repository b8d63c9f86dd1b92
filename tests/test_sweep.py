"""Sweeps: a real two-job Hydra multirun, its summary, and re-launching it (finished jobs are skipped)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lingmao.sweep import FINISHED_FILE, finished_result, mark_finished, write_summary
from tests.conftest import run_module, tiny_overrides

pytestmark = pytest.mark.slow


def _multirun(tmp_path: Path, train: Path, test: Path, sweep_dir: Path) -> subprocess.CompletedProcess:
    return run_module(
        "lingmao.train", "-m", *tiny_overrides(tmp_path, train, test, steps=6), "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2", "run_test=false", "logger.plots=false", "logger.print_config=false",
        "checkpoint_every=0", "optim.lr=1e-3,3e-4", f"hydra.sweep.dir={sweep_dir}",
    )


def _summary(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_two_job_sweep_summary_and_relaunch(small_corpus, tmp_path):
    train, test = small_corpus
    first = _multirun(tmp_path, train, test, tmp_path / "sweep1")
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]

    rows = _summary(tmp_path / "sweep1")
    assert [r["rank"] for r in rows] == ["1", "2"]
    assert {r["optim.lr"] for r in rows} == {"0.001", "0.0003"}
    assert all(r["status"] == "completed" for r in rows)
    losses = [float(r["best_val_loss"]) for r in rows]
    assert losses == sorted(losses)
    # each job: its own directory named by its overrides, and its own run directory (checkpoints)
    for r in rows:
        job_dir = Path(r["job_dir"])
        assert re.match(r"\d+-checkpoint_every-0__data.batch_size-8__", job_dir.name)  # number, then overrides
        assert f"optim.lr={r['optim.lr']}" in (job_dir / ".hydra" / "overrides.yaml").read_text()
    assert len({r["job_dir"] for r in rows}) == 2
    run_dirs = [d for d in (tmp_path / "outputs" / "runs").iterdir()]
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((run_dir / FINISHED_FILE).read_text())["global_step"] == 6

    # Re-launch: the finished job is skipped; the one without a finished marker resumes from its last.ckpt.
    unfinished = run_dirs[0]
    (unfinished / FINISHED_FILE).unlink()
    again = _multirun(tmp_path, train, test, tmp_path / "sweep2")
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert out.count("this run already finished") == 1
    assert out.count("resuming from") == 1 and str(unfinished / "checkpoints" / "last.ckpt") in out
    rows2 = _summary(tmp_path / "sweep2")
    assert {r["optim.lr"]: r["best_val_loss"] for r in rows2} == {r["optim.lr"]: r["best_val_loss"] for r in rows}


# ----------------------------------------------------------------------------------------------
# Pieces, without processes
# ----------------------------------------------------------------------------------------------
def _cfg(**run):
    base = {"auto_resume": True, "resume_from": None, "trainer": {"max_steps": 10, "max_epochs": 3}, "seed": 1,
            "model": {"d_model": 32}, "optim": {"lr": 1e-3}, "data": {"train_file": "a.jsonl"}}
    return OmegaConf.merge(base, run)


def test_finished_marker_is_honoured_only_for_the_same_limits(tmp_path):
    mark_finished(tmp_path, _cfg(), 2.5, 2.7, global_step=10)
    assert finished_result(tmp_path, _cfg()).best_val_loss == 2.5
    assert finished_result(tmp_path, _cfg(trainer={"max_steps": 20})) is None  # train longer: resume instead
    assert finished_result(tmp_path, _cfg(model={"d_model": 48})) is None  # another model: resume checks refuse
    assert finished_result(tmp_path, _cfg(auto_resume=False)) is None
    assert finished_result(tmp_path, _cfg(resume_from="x.ckpt")) is None
    (tmp_path / FINISHED_FILE).write_text("{broken")
    assert finished_result(tmp_path, _cfg()) is None


@pytest.mark.parametrize("failed", [False, True])
def test_summary_sorts_best_first_and_keeps_failed_jobs(tmp_path, failed):
    jobs = [("optim.lr=0.001", 2.0), ("optim.lr=0.0003", 1.5), ("optim.lr=0.01", None if failed else 3.0)]
    for i, (override, loss) in enumerate(jobs):
        job = tmp_path / str(i)
        job.mkdir()
        row = {"overrides": ["model=tiny", override], "best_val_loss": loss,
               "status": "failed" if loss is None else "completed", "job_dir": str(job)}
        (job / "result.json").write_text(json.dumps(row))
    rows = list(csv.DictReader(open(write_summary(tmp_path), encoding="utf-8")))
    assert [r["optim.lr"] for r in rows] == ["0.0003", "0.001", "0.01"]
    assert rows[-1]["status"] == ("failed" if failed else "completed")
    assert "model" not in rows[0]  # only the keys that differ between jobs get a column
