"""Where a run's metrics go: `<run dir>/metrics.csv` always, TensorBoard on request."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lightning.pytorch.loggers import Logger

from lingmao.checks import check_fields, number
from lingmao.compat import appending_csv_logger
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
    peak_tflops: float | None = number(None, gt=0)  # the GPU's peak TFLOP/s for MFU; null = lingmao.peak_flops

    def __post_init__(self) -> None:
        check_fields(self)


def build_loggers(config: LoggerConfig, run_dir: Path) -> list[Logger]:
    """CSV always (`<run dir>/metrics.csv`); TensorBoard too with `logger=tensorboard`."""
    loggers: list[Logger] = [appending_csv_logger(str(run_dir))]  # appends across resumes
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
