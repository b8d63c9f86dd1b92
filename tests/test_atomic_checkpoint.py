"""Checkpoints never corrupt: SIGKILL a real training run at random moments while it saves every step,
then load whatever is left; the next run resumes from it and cleans up the temporary files."""

from __future__ import annotations

import itertools
import multiprocessing
import random
import time

import pytest
import torch
from hydra import compose, initialize_config_dir

from lingmao.checkpointing import AtomicCheckpointIO, remove_stale_temporaries
from lingmao.config import CONF_DIR
from tests.conftest import tiny_overrides

MAX_RUN_KILLS, MAX_KILLS, MAX_SECONDS = 4, 20, 40


def test_atomic_save_replaces_and_leaves_no_temporary(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]

    class Boom(dict):
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io.save_checkpoint({"x": Boom()}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    (path.parent / ".last.ckpt.abc123.tmp").write_bytes(b"partial")
    assert remove_stale_temporaries(path.parent) == 1


def _train_forever(cfg) -> None:
    from lingmao.train import train

    train(cfg)


def _save_forever(checkpoint: dict, path: str, first: int) -> None:
    io = AtomicCheckpointIO()
    for version in itertools.count(first):
        checkpoint["version"] = version
        io.save_checkpoint(checkpoint, path)


def _wait(condition, proc, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.is_alive(), f"the process died by itself (exit code {proc.exitcode})"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


@pytest.mark.slow
def test_kill_9_during_saves_never_leaves_a_broken_checkpoint(tmp_path, small_corpus):
    """Part 1 kills real training runs (checkpoint every step) while they write; each next run resumes.
    Part 2 kills a process that does nothing but save a real checkpoint, at uniformly random moments."""
    train, test = small_corpus
    overrides = [
        *tiny_overrides(tmp_path, train, test, steps=1_000_000), "run_name=kill", "checkpoint_every_n_steps=1",
        "checkpoint_every=0", "run_test=false", "export=false", "trainer.val_check_interval=1000",
        "model.d_model=64", "model.dim_feedforward=256",  # about 3 MB a checkpoint
    ]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    ckpt_dir = tmp_path / "outputs" / "runs" / "kill" / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    # A forkserver that has imported torch and Lightning once: each run starts without the import cost.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["lingmao.train", "tests.test_atomic_checkpoint"])
    rng = random.Random(0)
    started = time.monotonic()

    def temporaries() -> list:
        return list(ckpt_dir.glob(".last.ckpt.*.tmp"))

    # Part 1: real runs, killed while writing a checkpoint (the temporary file exists).
    run_kills, steps = 0, []
    while run_kills < 2 or (run_kills < MAX_RUN_KILLS and time.monotonic() - started < MAX_SECONDS / 2):
        before = last.stat().st_mtime_ns if last.exists() else None
        proc = ctx.Process(target=_train_forever, args=(cfg,))
        proc.start()
        # After this run has completed a save of its own, at its next write.
        _wait(lambda before=before: last.exists() and last.stat().st_mtime_ns != before, proc)
        _wait(lambda: bool(temporaries()), proc)
        time.sleep(rng.uniform(0.0, 0.005))
        proc.kill()
        proc.join()
        run_kills += 1
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        assert ckpt["state_dict"] and ckpt["optimizer_states"]
        steps.append(ckpt["global_step"])
        assert len(list(ckpt_dir.glob(".*.tmp"))) <= 1  # each run removes what the previous kill left
    assert steps and steps == sorted(steps), f"each run resumes from the last checkpoint: {steps}"

    # Part 2: many kills at random moments of a loop of saves of that real checkpoint.
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    remove_stale_temporaries(ckpt_dir)  # what the last killed run left (a next run would remove it)
    save_kills = mid_write = 0
    versions = [0]  # each save loop numbers its saves on from the version the last kill left
    while save_kills < MAX_KILLS and time.monotonic() - started < MAX_SECONDS:
        proc = ctx.Process(target=_save_forever, args=(checkpoint, str(last), versions[-1] + 1))
        proc.start()
        time.sleep(rng.uniform(0.05, 0.4))
        proc.kill()
        proc.join()
        save_kills += 1
        mid_write += bool(temporaries())
        loaded = torch.load(last, map_location="cpu", weights_only=False)
        assert loaded["global_step"] == checkpoint["global_step"]
        assert all(torch.equal(loaded["state_dict"][k], v) for k, v in checkpoint["state_dict"].items())
        versions.append(loaded.get("version", 0))
        assert remove_stale_temporaries(ckpt_dir) <= 1
    print(
        f"\nkill -9: {run_kills} training runs killed mid-write (resumed steps {steps}); "
        f"{save_kills} save loops killed at random moments ({mid_write} mid-write, versions {versions}); "
        f"every checkpoint loaded; {time.monotonic() - started:.0f} s"
    )
    assert save_kills >= 5
    # The kills landed while a checkpoint was being written (else this part tested nothing), and each left the
    # newest whole save or one before it: never an older one, and the saves went on between kills.
    assert mid_write >= max(1, save_kills // 4), (mid_write, save_kills)  # the rest: before the first save
    assert versions == sorted(versions) and versions[-1] > 0, versions
