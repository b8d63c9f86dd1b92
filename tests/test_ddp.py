"""Lightning DDP for real on CPU: two processes over gloo, from the Python API and from the Hydra app.

This file is also the probe script of the first test: run as `python -m tests.test_ddp ARGS.json`, it
trains through `lingmao.train.train` with a callback that records, on each rank, the windows it saw
and a digest of its final weights. Lightning starts rank 1 by re-running the same command.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import ROOT, run_module

pytestmark = pytest.mark.slow

STEPS = 4


class Probe(L.Callback):
    """Per rank: a digest of every training window seen and of the final weights -> probe_rank<r>.json."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.windows: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, _ = batch
        self.windows += [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in x]

    def on_train_end(self, trainer, pl_module) -> None:
        h = hashlib.sha1()
        for name, tensor in sorted(pl_module.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().numpy().tobytes())
        record = {
            "rank": trainer.global_rank, "world_size": trainer.world_size, "windows": self.windows,
            "weights": h.hexdigest(), "global_step": trainer.global_step,
        }
        (self.out_dir / f"probe_rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _probe_main(args_file: str) -> None:
    from hydra import compose, initialize_config_dir

    from lingmao import train as train_mod
    from lingmao.config import CONF_DIR

    args = json.loads(Path(args_file).read_text())
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=args["overrides"])
    build = train_mod.instantiate_callbacks
    train_mod.instantiate_callbacks = lambda configs: [*build(configs), Probe(args["out_dir"])]
    train_mod.train(cfg)


def _overrides(tmp_path: Path, train: Path, test: Path) -> list[str]:
    from tests.conftest import tiny_overrides

    return [
        *tiny_overrides(tmp_path, train, test, steps=STEPS),
        "hardware.devices=2", "hardware.strategy=ddp", "hardware.cpu_threads=1",
        "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "run_test=false",
        "logger.plots=false", "logger.print_config=false", "checkpoint_every=0",
    ]


def muon_overrides(tmp_path, train, test) -> list[str]:
    """The DDP overrides with the default optimizer, Muon: whole matrices on every rank, averaged gradients."""
    return [o for o in _overrides(tmp_path, train, test) if o != "optim=adamw"] + ["optim=muon"]


def test_two_process_ddp_shards_batches_and_keeps_weights_identical(small_corpus, tmp_path):
    train, test = small_corpus
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"overrides": [*muon_overrides(tmp_path, train, test), "run_name=ddp"],
                                "out_dir": str(tmp_path)}))
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # `tests` from the checkout
    proc = run_module("tests.test_ddp", str(args), cwd=tmp_path, timeout=240, env={"PYTHONPATH": path})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"probe_rank{r}.json").read_text()) for r in (0, 1)]

    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [STEPS, STEPS]
    assert len(ranks[0]["windows"]) == len(ranks[1]["windows"]) == STEPS * 8  # batch_size 8 per rank
    # Each rank reads its own share of the windows ...
    assert not set(ranks[0]["windows"]) & set(ranks[1]["windows"])
    # ... and the averaged gradients keep the replicas identical.
    assert ranks[0]["weights"] == ranks[1]["weights"]

    run_dir = tmp_path / "outputs" / "runs" / "ddp"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "export" / "model.safetensors").is_file()  # written by rank 0 only
    assert (run_dir / "finished.json").is_file()

    # The checkpoint of the 2-process run resumes in one process (another world size).
    from hydra import compose, initialize_config_dir

    from lingmao import train as train_mod
    from lingmao.config import CONF_DIR

    one = [o for o in muon_overrides(tmp_path, train, test)
           if not o.startswith(("hardware.devices", "hardware.strategy"))]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*one, "run_name=ddp", f"trainer.max_steps={STEPS + 2}"])
    assert train_mod.train(cfg) is not None
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS + 2


def test_ddp_sweep_runs_each_job_once_with_all_ranks_on_its_parameters(small_corpus, tmp_path):
    """Under -m, Lightning re-runs the command line for rank 1: it must run that job alone, not the sweep."""
    train, test = small_corpus
    sweep_dir = tmp_path / "sweep"
    # hardware=ddp this time (a configured DDPStrategy), on CPU
    overrides = [o for o in _overrides(tmp_path, train, test) if o not in ("hardware=cpu", "hardware.strategy=ddp")]
    proc = run_module("lingmao.train", "-m", *overrides, "hardware=ddp", "hardware.accelerator=cpu",
                      "optim.lr=1e-3,3e-4", f"hydra.sweep.dir={sweep_dir}", timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("Launching 2 jobs") == 1, "a rank > 0 started the sweep again"

    job_dirs = sorted(p.parent for p in sweep_dir.rglob("result.json"))
    assert len(job_dirs) == 2
    run_lines = set()
    for job in job_dirs:
        # rank 0 logs to train.log, rank 1 (started by Lightning) to train_ddp_process_1.log, in the same job dir
        rank0 = re.findall(r"run directory: (.*)", (job / "train.log").read_text())
        rank1 = re.findall(r"run directory: (.*)", (job / "train_ddp_process_1.log").read_text())
        assert rank0 == rank1 and len(rank0) == 1, (rank0, rank1)
        run_lines.add(rank0[0])
    assert len(run_lines) == 2  # one run directory (checkpoints) per job, shared by its two ranks
    for run_dir in run_lines:
        assert (Path(run_dir) / "finished.json").is_file()
    # no stray Hydra run directories from the extra ranks
    assert not (tmp_path / "outputs" / "hydra").exists()

    with open(sweep_dir / "summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["optim.lr"] for r in rows) == ["0.0003", "0.001"]
    assert all(r["status"] == "completed" and float(r["best_val_loss"]) > 0 for r in rows)


def test_config_flags_survive_the_rewritten_command_line():
    from lingmao.distributed import _config_flags, _kept_hydra_overrides

    argv = ["-m", "-cn", "other", "model=tiny", "--config-dir=/x", "optim.lr=1e-3,3e-4"]
    assert _config_flags(argv) == ["--config-name", "other", "--config-dir", "/x"]
    job_hydra = ["hydra.mode=MULTIRUN", "hydra.sweep.dir=/s", "hydra.job.chdir=true", "hydra.verbose=true"]
    kept = _kept_hydra_overrides(job_hydra)
    assert kept == ["hydra.job.chdir=true", "hydra.verbose=true"]


if __name__ == "__main__":
    _probe_main(sys.argv[1])
