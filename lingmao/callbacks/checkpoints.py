"""Regular checkpoints: `last.ckpt` every N steps, and a kept checkpoint every N epochs (not every few seconds)."""

from __future__ import annotations

import time

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
    """`epochNNN.ckpt` every `every_n_epochs` epochs, kept; skipped when the previous one is younger than
    `min_interval_minutes`, so a run over a small file does not write a checkpoint every few seconds."""

    def __init__(self, dirpath: str, every_n_epochs: int = 1, min_interval_minutes: float = 10.0) -> None:
        super().__init__(
            dirpath=dirpath, filename="epoch{epoch:03d}", auto_insert_metric_name=False, save_top_k=-1,
            every_n_epochs=every_n_epochs or None, save_on_train_epoch_end=True, enable_version_counter=False,
        )
        self.epoch_interval = every_n_epochs
        self.min_interval_minutes = min_interval_minutes
        self._last_saved_at: float | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.epoch_interval:
            return
        now = time.monotonic()
        recent = self._last_saved_at is not None and now - self._last_saved_at < self.min_interval_minutes * 60
        # Every rank takes the same decision (rank 0's clock), since saving is collective.
        if trainer.strategy.broadcast(recent, src=0):
            return
        before = self.best_model_path
        super().on_train_epoch_end(trainer, pl_module)
        if self.best_model_path != before:
            self._last_saved_at = now
