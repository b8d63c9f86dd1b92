"""Stopping and continuing: save on SIGINT / SIGTERM, exact resume, a checkpoint when training crashes.

- `SaveOnInterrupt` turns SIGINT / SIGTERM during training into: finish the current optimizer step, save
  `last.ckpt`, raise `TrainingInterrupted` (the entry point exits 130 / 143). In a multi-process run the ranks
  agree on it at every step boundary (an all-reduce of the signal number, started one step and read the
  next, so it never waits on the device), so a signal to one rank or to all stops every rank at the same step;
  likewise at every batch of the validation and test that end a run, so no rank is left waiting for another.
- `ExactResume` stores the RNG states in each checkpoint and restores them before every step, so dropout after
  a resume draws the numbers of an uninterrupted run.
- `CrashCheckpoint` saves `crash.ckpt` when training dies of an exception, if the weights are finite.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn

from lingmao.checkpointing import (
    CRASH,
    INTERRUPTS,
    LAST,
    META_KEY,
    SIGNALS,
    TrainingInterrupted,
    can_set_signals,
    remove_stale_temporaries,
)
from lingmao.errors import LingmaoError


class SaveOnInterrupt(Checkpoint):
    """SIGINT / SIGTERM during training: save `last.ckpt` at the next optimizer-step boundary, then stop.

    With `save=False` the run still stops there (exit 130 / 143), without saving. A `Checkpoint` subclass so
    that Lightning runs it after `ModelCheckpoint`, whose save of the same step it reuses. Also refreshes
    `last.ckpt` when training ends, so that it always holds the final step.
    """

    def __init__(self, dirpath: str | Path, save: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.save = save
        self._previous: dict[int, Any] = {}
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._last_step = -1
        self._stopping: TrainingInterrupted | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed after Lightning's own SIGTERM handler (registered before this hook), so ours wins; Lightning
        # puts the previous handlers back at teardown.
        if trainer.is_global_zero:
            remove_stale_temporaries(self.dirpath)
        self._pending, self._last_step, self._stopping = None, trainer.global_step, None
        if not can_set_signals():
            return
        self._previous = {s: signal.getsignal(s) for s in SIGNALS}
        INTERRUPTS.signum, INTERRUPTS.handling, INTERRUPTS.deferred = None, False, True
        for s in SIGNALS:
            signal.signal(s, INTERRUPTS.handler)

    def _release(self) -> None:
        INTERRUPTS.deferred = False
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _agreed_signal(self, trainer: L.Trainer, wait: bool = False) -> int:
        """The signal any rank has received (0: none). Every rank calls this at the same steps."""
        local = INTERRUPTS.signum or 0
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return local
        agreed = 0
        if self._pending is not None:
            work, value = self._pending
            work.wait()
            agreed = int(value.item())
            self._pending = None
        value = torch.tensor([local], dtype=torch.int32, device=trainer.strategy.root_device)
        work = dist.all_reduce(value, op=dist.ReduceOp.MAX, async_op=True)
        if wait:
            work.wait()
            return max(agreed, int(value.item()))
        self._pending = (work, value)
        return agreed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_step:  # inside a gradient-accumulation cycle: no step boundary
            return
        self._last_step = trainer.global_step
        signum = self._agreed_signal(trainer)
        if signum:
            self._stop(trainer, signum)
            return
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            # The final step: saved here, where Lightning's own checkpoints are saved, because its loops count
            # one more logged step when they resume from a checkpoint written after this hook.
            self._save_last(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._stopping is not None:
            raise self._stopping

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        final_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        if self._stopping is None and final_epoch:
            self._save_last(trainer)  # the final epoch of an epoch-limited run

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stopping is None:
            signum = self._agreed_signal(trainer, wait=True)
            if signum:
                self._stop(trainer, signum)
        if self._stopping is not None:
            raise self._stopping
        self._release()
        self._save_last(trainer)  # a run stopped otherwise (no-op when the final step is saved already)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release()

    # -- the validation and test after training, in a run of several processes -------------------------
    # A signal to one rank must not leave the others waiting in the loop's collectives: the ranks agree on it
    # at the start, after every batch and at the end, and stop together (without saving: last.ckpt holds the
    # final step already).
    def _evaluating(self, trainer: L.Trainer) -> bool:
        return trainer.world_size > 1 and trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING)

    def _evaluation_start(self, trainer: L.Trainer) -> None:
        if not self._evaluating(trainer) or not can_set_signals():
            return
        self._previous = {s: signal.getsignal(s) for s in SIGNALS}
        INTERRUPTS.deferred = True
        for s in SIGNALS:
            signal.signal(s, INTERRUPTS.handler)
        self._pending = None
        self._raise_if_agreed(trainer, wait=True)

    def _raise_if_agreed(self, trainer: L.Trainer, wait: bool = False) -> None:
        signum = self._agreed_signal(trainer, wait=wait)
        if signum:
            if self._pending is not None:
                self._pending[0].wait()
                self._pending = None
            INTERRUPTS.handling = True
            self._release()
            last = self.dirpath / LAST
            raise interrupted(trainer, TrainingInterrupted(signum, last if last.exists() else None,
                                                           trainer.global_step))

    def _evaluation_end(self, trainer: L.Trainer) -> None:
        if self._evaluating(trainer) and self._previous:
            self._raise_if_agreed(trainer, wait=True)
            self._release()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluation_start(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluation_start(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._evaluating(trainer) and self._previous:
            self._raise_if_agreed(trainer)

    def on_test_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._evaluating(trainer) and self._previous:
            self._raise_if_agreed(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluation_end(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluation_end(trainer)

    def _save_last(self, trainer: L.Trainer) -> Path:
        """Write last.ckpt unless it already holds this optimizer step."""
        path = self.dirpath / LAST
        saved = getattr(trainer.strategy.checkpoint_io, "saved", {}).get(str(path.resolve()))
        needed = saved is None or saved[0] != trainer.global_step or not path.exists()  # a file, or a directory
        # Only rank 0 knows what it saved, and save_checkpoint holds a barrier: every rank must agree.
        if trainer.strategy.broadcast(needed, src=0):
            trainer.save_checkpoint(path, weights_only=False)
        return path

    def _stop(self, trainer: L.Trainer, signum: int) -> None:
        """Save this step, and stop before the next one: the step's metrics are written in between."""
        INTERRUPTS.handling = True
        if self._pending is not None:  # let the last agreement finish before the save's own collectives
            self._pending[0].wait()
            self._pending = None
        path = self._save_last(trainer) if self.save else None
        self._stopping = interrupted(trainer, TrainingInterrupted(signum, path, trainer.global_step))


def interrupted(trainer: L.Trainer, exc: TrainingInterrupted) -> TrainingInterrupted:
    """`exc`, told to leave after the launching process when this rank was started by Lightning's launcher.

    Lightning's rank 0 watches the ranks it started and kills every process, itself included (SIGKILL), as soon as
    one of them exits with a non-zero code: a rank > 0 that left first with 143 would turn rank 0's own clean
    exit with 143 into death by SIGKILL. Ranks started by torchrun or SLURM leave at once.
    """
    from lightning.fabric.plugins.environments import LightningEnvironment

    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.world_size > 1 and trainer.local_rank > 0 and isinstance(environment, LightningEnvironment):
        exc.after_pid = os.getppid()
    return exc


class ExactResume(L.Callback):
    """The RNG states after each training step go into every checkpoint and are put back before the next step:
    after a resume, and also after validation or anything else between two steps that draws random numbers,
    so dropout draws the same numbers either way. Also records the tokenizer's fingerprint for resume checks."""

    def __init__(self) -> None:
        self._after_step: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._after_step is not None:
            set_rng_states(self._after_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._after_step = collect_rng_states()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        from lingmao.data.tokenizer import tokenizer_fingerprint

        meta = checkpoint.setdefault(META_KEY, {})
        meta["rng"] = self._after_step if self._after_step is not None else collect_rng_states()
        meta["world_size"] = trainer.world_size  # processes that wrote it (a resume may use another number)
        dm = trainer.datamodule
        if dm is not None and getattr(dm, "tokenizer", None) is not None:
            meta["tokenizer"] = tokenizer_fingerprint(dm.tokenizer)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._after_step = (checkpoint.get(META_KEY) or {}).get("rng")


def collect_rng_states() -> dict[str, Any]:
    """The global RNG states, in types that `torch.load(weights_only=True)` accepts (no numpy arrays)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class CrashCheckpoint(Checkpoint):
    """An exception in training saves `crash.ckpt` (when the weights are finite) and says where.

    Not Lightning's `OnExceptionCheckpoint`: with one of those among the callbacks, `fit(ckpt_path=None)`
    resumes from the newest checkpoint file it finds, which would override `auto_resume=false`. Interrupts and
    the user's own errors save nothing here, and non-finite weights are never saved. `last.ckpt` is left alone:
    it stays the last clean step for auto-resume.

    In a run of several processes nothing is saved: saving is collective, and the other ranks are not taking
    part (they are waiting in the step's own collectives). The rank that raised says so and exits at once; the
    next run resumes from `last.ckpt`.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (TrainingInterrupted, KeyboardInterrupt, LingmaoError)):
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.global_step == 0:
            return
        if trainer.world_size > 1:
            print(
                f"training crashed on rank {trainer.global_rank} at step {trainer.global_step} "
                f"({type(exception).__name__}); no crash checkpoint in a run of several processes (the others "
                f"cannot join the save): the next run resumes from {self.dirpath / LAST}",
                file=sys.stderr, flush=True,
            )
            stop_started_ranks(trainer)
            return
        if not all(torch.isfinite(p).all() for p in pl_module.parameters()):
            print("training crashed with non-finite weights: no crash checkpoint written", file=sys.stderr)
            return
        path = self.dirpath / CRASH
        try:
            trainer.save_checkpoint(path, weights_only=False)
        except Exception as exc:  # the crash itself may be a full disk: report it, keep the first error
            print(f"training crashed; saving a crash checkpoint failed too ({exc})", file=sys.stderr)
            return
        print(
            f"training crashed at step {trainer.global_step} ({type(exception).__name__}); saved {path}\n"
            f"to continue from it: resume_from={path} (auto_resume would use {self.dirpath / LAST})",
            file=sys.stderr, flush=True,
        )


def stop_started_ranks(trainer: L.Trainer) -> None:
    """On the rank 0 that Lightning's launcher runs, kill the ranks it started (as Lightning does on Ctrl-C): they
    wait in the step's collectives for this one, over NCCL until the process group's timeout. (Over gloo they
    would fail within a second or two when this process exits; torchrun and SLURM stop them themselves.)"""
    launcher = trainer.strategy.launcher
    if trainer.global_rank == 0 and launcher is not None and getattr(launcher, "procs", None):
        launcher.kill(signal.SIGKILL)
