"""Where a run's metrics go: `<run dir>/metrics.csv` always, TensorBoard on request."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from lingmao.checks import check_fields, number
from lingmao.errors import LingmaoError


@dataclass
class LoggerConfig:
    """How a run is recorded and shown."""

    KEY: ClassVar[str] = "logger"
    name: str = "csv"
    tensorboard: bool = False  # TensorBoard events in <run dir>/tensorboard (pip install tensorboard)
    plots: bool = True  # draw <run dir>/plots/training.png after each validation and at the end
    print_config: bool = True  # print the composed config as a tree at start
    progress_every_n_steps: int = number(50, ge=1)  # no terminal (CI logs, nohup): a progress line every N steps
    progress_refresh_rate: int = number(1, ge=1)  # on a terminal: refresh the progress bar every N batches
    peak_tflops: float | None = number(None, gt=0)  # the GPU's peak TFLOP/s for MFU; null = Lightning's table

    def __post_init__(self) -> None:
        check_fields(self)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run appends to it instead, under the
    file's own header (new columns rewrite the file with a wider header, as Lightning does)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))

    def _check_log_dir_exists(self) -> None:
        # A private Lightning method, overridden because CSVLogger has no option to append: since
        # Lightning-AI/pytorch-lightning#19446 it deletes an existing metrics.csv here.
        pass


class AppendingCSVLogger(CSVLogger):
    """`CSVLogger` writing `<save_dir>/metrics.csv`, appending when the file exists (resumed runs)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def build_loggers(config: LoggerConfig, run_dir: Path) -> list[Logger]:
    """CSV always (`<run dir>/metrics.csv`); TensorBoard too with `logger=tensorboard`."""
    loggers: list[Logger] = [AppendingCSVLogger(save_dir=str(run_dir), name="", version="")]
    if config.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise LingmaoError(
                "logger=tensorboard needs the 'tensorboard' package: pip install tensorboard (or use logger=csv)"
            ) from None
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    return loggers
