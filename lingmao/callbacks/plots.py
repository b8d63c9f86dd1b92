"""The training plot, redrawn while the run goes (`lingmao.plot` draws it from metrics.csv)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


class TrainingPlots(L.Callback):
    """Redraw `<run dir>/plots/training.png` after each validation and at the end of training."""

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled

    def _draw(self, trainer: L.Trainer) -> None:
        if not (self.enabled and trainer.is_global_zero):
            return
        from lingmao.plot import plot_runs

        started = time.perf_counter()
        try:
            for logger in trainer.loggers:
                logger.save()
            path = plot_runs([self.run_dir])
        except Exception as exc:  # a plot must never stop training
            log.warning("could not draw the training plot: %s", exc)
            return
        log.debug("drew %s in %.2f s", path, time.perf_counter() - started)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._draw(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer)
