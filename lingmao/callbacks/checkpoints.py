"""Regular checkpoints: `last.ckpt` every N steps, and a kept checkpoint every N epochs (not every few seconds)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt`, refreshed every `every_n_steps` optimizer steps (0 = at validations only) and always
    overwritten in place: Lightning's version counter would otherwise write `last-v1.ckpt` beside a `last.ckpt` it
    did not write in this process, and auto-resume would read the older one.

    Never at train-epoch ends or at the end of training (`SaveOnInterrupt` saves the final step): there Lightning
    has already counted the step for its loggers, and a run resumed from such a checkpoint labels (and drops)
    its metrics one step off.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 0) -> None:
        super().__init__(
            dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_steps or None,
            enable_version_counter=False, save_on_train_epoch_end=False,
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass


class EpochCheckpoint(ModelCheckpoint):
    """`epochNNN.ckpt` every `every_n_epochs` epochs, kept; skipped when the newest epoch checkpoint in `dirpath`
    is younger than `min_interval_minutes`, so a run over a small file does not write a checkpoint every few
    seconds. The interval counts from that file's time, whichever process wrote it: resuming does not start a new
    interval."""

    def __init__(self, dirpath: str, every_n_epochs: int = 1, min_interval_minutes: float = 10.0) -> None:
        super().__init__(
            dirpath=dirpath, filename="epoch{epoch:03d}", auto_insert_metric_name=False, save_top_k=-1,
            every_n_epochs=every_n_epochs or None, save_on_train_epoch_end=True, enable_version_counter=False,
        )
        self.epoch_interval = every_n_epochs
        self.min_interval_minutes = min_interval_minutes

    def last_saved_at(self) -> float | None:
        """The time (seconds since the epoch) the newest epoch checkpoint in `dirpath` was written, or None."""
        times = []
        for path in Path(str(self.dirpath)).glob("epoch*.ckpt"):
            try:
                times.append(path.stat().st_mtime)
            except OSError:  # removed meanwhile
                pass
        return max(times, default=None)

    def too_soon(self) -> bool:
        """Whether the newest epoch checkpoint is younger than `min_interval_minutes`."""
        last = self.last_saved_at()
        return last is not None and time.time() - last < self.min_interval_minutes * 60

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.epoch_interval:
            return
        # Every rank takes the same decision (rank 0's view of the folder), since saving is collective.
        if trainer.strategy.broadcast(self.too_soon(), src=0):
            return
        super().on_train_epoch_end(trainer, pl_module)
