"""Progress output: a tqdm bar on a terminal, one plain line every N steps in logs (CI, nohup)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only

from lingmao.callbacks.monitoring import TrainingMonitor

log = logging.getLogger("lingmao.progress")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _latest(trainer: L.Trainer) -> Mapping[str, float]:
    monitor = next((c for c in trainer.callbacks if isinstance(c, TrainingMonitor)), None)
    return monitor.latest if monitor is not None else {}


def progress_fields(latest: Mapping[str, float]) -> dict[str, str]:
    out: dict[str, str] = {}
    if "loss" in latest:
        out["loss"] = f"{latest['loss']:.3f}"
    if "lr" in latest:
        out["lr"] = f"{latest['lr']:.2e}"
    if "tokens_per_sec" in latest:
        out["tok/s"] = f"{latest['tokens_per_sec']:,.0f}"
    if "mfu" in latest:
        out["mfu"] = f"{latest['mfu']:.1%}"
    if "eta" in latest:
        out["eta"] = format_duration(latest["eta"])
    return out


class TerminalProgressBar(TQDMProgressBar):
    """Lightning's bar, showing the monitor's loss, lr, tokens/s and the whole run's ETA."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        items.update(progress_fields(_latest(trainer)))
        return items


class LineProgress(L.Callback):
    """For logs (no terminal): one line every `every_n_steps` optimizer steps and one per validation."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = max(1, int(every_n_steps))
        self._last_step = -1

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        where = f"step {step}/{total} ({step / total:.0%})" if total else f"step {step}"
        fields = progress_fields(_latest(trainer))
        text = " | ".join([where, f"epoch {trainer.current_epoch}", *(f"{k} {v}" for k, v in fields.items())])
        log.info("%s", text)

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        parts = [f"{name} {float(m[key]):.4g}" for key, name in
                 (("val/loss", "loss"), ("val/ppl", "ppl"), ("val/bpc", "bpc")) if key in m]
        if parts:
            log.info("validation at step %d: %s", trainer.global_step, ", ".join(parts))


def is_terminal() -> bool:
    """Whether the progress bar's stream (stdout, where Lightning's tqdm writes) is a terminal."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def progress_output(enabled: bool = True, refresh_rate: int = 1, every_n_steps: int = 50) -> L.Callback | None:
    """A tqdm bar on a terminal, else quiet progress lines; nothing when progress output is off."""
    if not enabled:
        return None
    if is_terminal():
        return TerminalProgressBar(refresh_rate=max(1, int(refresh_rate)))
    return LineProgress(every_n_steps)
