"""Fault tolerance: atomic checkpoint files, save-on-interrupt, crash checkpoints, resume checks.

- `AtomicCheckpointIO` writes every checkpoint to a temporary file beside its target, fsyncs it and
  renames it over the old one, so a kill at any moment leaves the previous checkpoint loadable.
- `SaveOnInterrupt` turns SIGINT / SIGTERM during training into: finish the current optimizer step,
  save `last.ckpt`, raise `TrainingInterrupted` (the entry point exits 130 / 143).
- `ExactResume` stores the RNG states in each checkpoint and restores them on resume, so dropout
  after a resume draws the numbers of an uninterrupted run, and makes sure the train loader gets its
  saved position (`lingmao.data.ResumableDataLoader`).
- `CrashCheckpoint` saves `crash.ckpt` when training dies of an exception, if the weights are finite.
- `check_resume_compatible` compares a checkpoint with the model about to be trained, key by key.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from tokenizers import Tokenizer

from lingmao.data.tokenizer import tokenizer_fingerprint
from lingmao.errors import LingmaoError
from lingmao.io import atomic_write

log = logging.getLogger(__name__)

LAST, CRASH = "last.ckpt", "crash.ckpt"
META_KEY = "lingmao"
SHAPE_KEYS = ("d_model", "nhead", "num_layers", "dim_feedforward", "max_len", "tie_weights", "norm_first", "activation")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


# ----------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temporary file in the checkpoint's own directory, fsync, `os.replace`.

    Lightning's default writes through a temporary location and a move, which is a plain copy (and
    leaves a partial file behind when killed) if that location is on another filesystem.
    """

    def __init__(self) -> None:
        super().__init__()
        self.saved: dict[str, tuple[int, int] | None] = {}  # path -> (global step, batches done) written there

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda f: torch.save(checkpoint, f))
        self.saved[str(Path(path).resolve())] = _checkpoint_progress(checkpoint)


def _checkpoint_progress(checkpoint: dict[str, Any]) -> tuple[int, int] | None:
    try:
        batches = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
        return int(checkpoint["global_step"]), int(batches)
    except (KeyError, TypeError):
        return None


def remove_stale_temporaries(directory: str | Path) -> int:
    """Delete the temporary files a killed save left in `directory` (names as `lingmao.io.atomic_write` makes)."""
    removed = 0
    for tmp in Path(directory).glob(".*.ckpt.*.tmp"):
        try:
            tmp.unlink()
            removed += 1
        except OSError:
            pass
    return removed


# ----------------------------------------------------------------------------------------------
# Interrupts
# ----------------------------------------------------------------------------------------------
class TrainingInterrupted(BaseException):
    """Raised after SIGINT / SIGTERM; `exit_code` is the shell convention 128 + signal number.

    A BaseException like KeyboardInterrupt (so `except Exception` does not swallow it), but not a
    KeyboardInterrupt, which Lightning turns into exit code 1.
    """

    def __init__(self, signum: int, checkpoint: Path | None = None, step: int | None = None) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step
        super().__init__(self.message())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        name = signal.Signals(self.signum).name
        if self.checkpoint is None:
            return f"interrupted by {name}; no checkpoint was written by this run since it started"
        return (
            f"interrupted by {name}: saved step {self.step} to {self.checkpoint}\n"
            f"to continue, run the same command again (auto_resume=true), or add resume_from={self.checkpoint}"
        )


class _InterruptState:
    """Process-wide: which signal arrived, and whether training should save before stopping."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False  # True while a training loop will handle the signal at a step boundary
        self.handling = False  # the interrupt is being acted on: further signals are only reported

    def handler(self, signum: int, frame: Any) -> None:
        if self.handling or (self.signum is not None and self.deferred):
            print(
                f"\n{signal.Signals(signum).name} again: still saving the checkpoint, please wait "
                f"(kill -9 {os.getpid()} stops without it; the previous checkpoint stays loadable)",
                file=sys.stderr, flush=True,
            )
            return
        self.signum = signum
        if not self.deferred:
            self.handling = True
            raise TrainingInterrupted(signum)
        print(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint after the current step ...",
            file=sys.stderr, flush=True,
        )


_STATE = _InterruptState()


@contextmanager
def interrupts_exit_cleanly() -> Iterator[None]:
    """Outside training loops, SIGINT / SIGTERM raise `TrainingInterrupted` at once (exit 130 / 143)."""
    if not _can_set_signals():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _STATE.__init__()
    for s in SIGNALS:
        signal.signal(s, _STATE.handler)
    try:
        yield
    finally:
        # After an interruption the process is on its way out with 130 / 143: a further Ctrl-C must not turn
        # that into death by signal, so the signals stay caught (ignored) instead of getting their old handlers.
        interrupted = _STATE.signum is not None
        for s, h in previous.items():
            signal.signal(s, signal.SIG_IGN if interrupted else h)


def _can_set_signals() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class SaveOnInterrupt(Checkpoint):
    """SIGINT / SIGTERM during training: save `last.ckpt` at the next optimizer-step boundary, then stop.

    With `save=False` the run still stops there (exit 130 / 143), without saving. A `Checkpoint`
    subclass so that Lightning runs it after `ModelCheckpoint`, whose save of the same step it reuses.
    Also refreshes `last.ckpt` when training ends, so that it always holds the final step.
    """

    def __init__(self, checkpoint_dir: str | Path, save: bool = True) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.save = save
        self._previous: dict[int, Any] = {}

    # signals ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning's own SIGTERM handler is in place (it is registered before this hook), so ours wins;
        # Lightning puts the previous handlers back at teardown.
        if trainer.is_global_zero:
            remove_stale_temporaries(self.checkpoint_dir)
        if not _can_set_signals():
            return
        self._previous = {s: signal.getsignal(s) for s in SIGNALS}
        _STATE.signum, _STATE.handling, _STATE.deferred = None, False, True
        for s in SIGNALS:
            signal.signal(s, _STATE.handler)

    def _release(self) -> None:
        _STATE.deferred = False
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if _STATE.signum is not None and _at_step_boundary(trainer):
            self._stop(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _STATE.signum is not None:
            self._stop(trainer)
        self._release()
        self._save_last(trainer)

    def _save_last(self, trainer: L.Trainer) -> Path:
        """Write last.ckpt unless it already holds this very moment of training."""
        path = self.checkpoint_dir / LAST
        saved = getattr(trainer.strategy.checkpoint_io, "saved", {})
        needed = saved.get(str(path.resolve())) != _progress(trainer) or not path.is_file()
        # Only rank 0 knows what it saved, and save_checkpoint holds a barrier: every rank must agree.
        if trainer.strategy.broadcast(needed, src=0):
            trainer.save_checkpoint(path)
        return path

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release()

    def _stop(self, trainer: L.Trainer) -> None:
        _STATE.handling = True
        signum = _STATE.signum
        assert signum is not None
        path = self._save_last(trainer) if self.save else None
        raise TrainingInterrupted(signum, path, trainer.global_step)


class ExactResume(L.Callback):
    """What a resumed run needs, beyond Lightning's own state, to continue as if it had never stopped.

    - The RNG states after each training step go into every checkpoint and are put back before the
      next step: after a resume, and also after validation or anything else between two steps that
      draws random numbers, so dropout draws the same numbers either way.
    - The train loader's saved position, which Lightning 2.6 drops in some cases (see below).
    - The tokenizer's fingerprint, for `check_resume_compatible`.
    """

    def __init__(self) -> None:
        self._after_step: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _load_pending_loader_states(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._after_step is not None:
            _set_rng_states(self._after_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._after_step = _collect_rng_states()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.setdefault(META_KEY, {})
        meta["rng"] = self._after_step if self._after_step is not None else _collect_rng_states()
        dm = trainer.datamodule
        if dm is not None and getattr(dm, "tokenizer", None) is not None:
            meta["tokenizer"] = tokenizer_fingerprint(dm.tokenizer)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._after_step = (checkpoint.get(META_KEY) or {}).get("rng")


def _collect_rng_states() -> dict[str, Any]:
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


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _load_pending_loader_states(trainer: L.Trainer) -> None:
    """Give the train loader its saved position, which Lightning 2.6 drops when the loader was built
    before the checkpoint was restored (as `estimated_stepping_batches` in `configure_optimizers` does).
    Runs before the first batch is drawn: the loader reads the position when its iteration starts."""
    fit_loop = trainer.fit_loop
    states = getattr(fit_loop, "_combined_loader_states_to_load", None)
    loader = getattr(fit_loop, "_combined_loader", None)
    if states and loader is not None:
        loader._load_state_dicts(states)
        fit_loop._combined_loader_states_to_load = []


def _progress(trainer: L.Trainer) -> tuple[int, int]:
    return trainer.global_step, trainer.fit_loop.epoch_loop.batch_progress.total.completed


def _at_step_boundary(trainer: L.Trainer) -> bool:
    """True unless gradients of a partial accumulation are pending (a checkpoint would lose them)."""
    try:
        return not trainer.fit_loop.epoch_loop._should_accumulate()
    except AttributeError:  # a Lightning without this helper: save anyway
        return True


def fault_tolerance_callbacks(checkpoint_dir: str | Path, save_on_interrupt: bool = True) -> list[L.Callback]:
    """The callbacks of this module, for `Trainer(callbacks=...)`, with `plugins=[AtomicCheckpointIO()]`."""
    return [ExactResume(), SaveOnInterrupt(checkpoint_dir, save_on_interrupt), CrashCheckpoint(checkpoint_dir)]


# ----------------------------------------------------------------------------------------------
# Crashes
# ----------------------------------------------------------------------------------------------
class CrashCheckpoint(Checkpoint):
    """An exception in training saves `crash.ckpt` (when the weights are finite) and says where.

    `last.ckpt` is left alone: it stays the last clean step for auto-resume.
    """

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (TrainingInterrupted, KeyboardInterrupt, LingmaoError)):
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.global_step == 0:
            return
        if not all(torch.isfinite(p).all() for p in pl_module.parameters()):
            print("training crashed with non-finite weights: no crash checkpoint written", file=sys.stderr)
            return
        path = self.checkpoint_dir / CRASH
        try:
            trainer.save_checkpoint(path)
        except Exception as exc:  # the crash itself may be a full disk: report it, keep the first error
            print(f"training crashed; saving a crash checkpoint failed too ({exc})", file=sys.stderr)
            return
        print(
            f"training crashed at step {trainer.global_step} ({type(exception).__name__}); saved {path}\n"
            f"to continue from it: resume_from={path} (auto_resume would use {self.checkpoint_dir / LAST})",
            file=sys.stderr, flush=True,
        )


# ----------------------------------------------------------------------------------------------
# Resume checks
# ----------------------------------------------------------------------------------------------
def check_resume_compatible(path: str | Path, lm: L.LightningModule, tokenizer: Tokenizer | None = None) -> dict:
    """Stop with a `LingmaoError` listing every difference when `path` cannot resume into `lm`.

    Returns {"epoch", "global_step"} of the checkpoint, for the log line.
    """
    path = Path(path)
    afresh = "to start afresh instead, add auto_resume=false (or choose another run_name); the checkpoint is kept"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:
        raise LingmaoError(f"{path}: cannot read the checkpoint ({str(exc).splitlines()[0]}); {afresh}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise LingmaoError(f"{path}: not a training checkpoint (no state_dict); {afresh}")

    diffs: list[str] = []
    hp = ckpt.get("hyper_parameters") or {}
    old_model, new_model = hp.get("model") or {}, lm.hparams.get("model") or {}
    for key in SHAPE_KEYS:
        if key in old_model and old_model.get(key) != new_model.get(key):
            diffs.append(f"model.{key}: checkpoint {old_model.get(key)!r}, now {new_model.get(key)!r}")
    if "vocab_size" in hp and hp["vocab_size"] != lm.hparams.get("vocab_size"):
        diffs.append(f"vocabulary size: checkpoint {hp['vocab_size']}, now {lm.hparams.get('vocab_size')}")
    old_tok = (ckpt.get(META_KEY) or {}).get("tokenizer")
    if tokenizer is not None and old_tok and old_tok != tokenizer_fingerprint(tokenizer):
        diffs.append("tokenizer: another vocabulary or settings than the checkpoint's (data.tokenizer_path, data.*)")
    if not diffs:  # config keys agree: compare the tensors themselves
        old_sd, new_sd = ckpt["state_dict"], lm.state_dict()
        for key in sorted(set(old_sd) | set(new_sd)):
            if key not in new_sd:
                diffs.append(f"{key}: only in the checkpoint")
            elif key not in old_sd:
                diffs.append(f"{key}: missing from the checkpoint")
            elif tuple(old_sd[key].shape) != tuple(new_sd[key].shape):
                diffs.append(f"{key}: checkpoint shape {tuple(old_sd[key].shape)}, now {tuple(new_sd[key].shape)}")
    if diffs:
        shown = "; ".join(diffs[:12]) + (f"; ... ({len(diffs) - 12} more)" if len(diffs) > 12 else "")
        raise LingmaoError(f"{path} does not match this run: {shown}. Use the checkpoint's settings, or {afresh}")
    return {"epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step")}
