"""Night mode: between `night.start` and `night.end` (local time) the run slows down and leaves the machine quieter.

This module decides when it is night and applies the night's settings through public hooks: the batch size
(the datamodule's `batch_size`, read when the train loader is built), the learning rate
(`LingmaoLM.set_lr_scale`), and a share of the machine (`lingmao.hardware.ProcessLimits`: CPU threads and
cores, or CUDA / MPS memory). The clock is read at the start of training and at every epoch boundary (and every
`check_every_n_steps` optimizer steps for the limits only), so a run that spans the evening enters and leaves
night mode on its own. Batch size, accumulation and learning rate change only at epoch boundaries; the train
DataLoader is rebuilt there when the batch size changes.

Nothing is taken from the checkpoint but the record of what night mode changed (for the run summary): a resumed
run applies the state for the time it resumes at.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L

from lingmao.callbacks.monitoring import logs_this_step
from lingmao.checks import check_fields, number
from lingmao.errors import LingmaoError
from lingmao.hardware import ProcessLimits

log = logging.getLogger(__name__)

Clock = Callable[[], dt.time]


# ----------------------------------------------------------------------------------------------
# Time, window, clock
# ----------------------------------------------------------------------------------------------
def parse_time(value: Any, key: str) -> dt.time | None:
    """"22:00" / "07:30:15" -> time; None or "" -> None. `key` names the config key in errors."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, dt.time):
        return value
    if isinstance(value, bool) or not isinstance(value, str):
        hint = ""
        if isinstance(value, int) and not isinstance(value, bool) and 60 <= value < 24 * 60:
            # YAML 1.1 reads an unquoted 22:00 as the base-60 number 1320.
            hint = f' (an unquoted {value // 60}:{value % 60:02d} in a YAML file is read as {value}; quote it)'
        raise LingmaoError(f'{key}: expected a time like "22:00", got {value!r}{hint}')
    try:
        return dt.time.fromisoformat(value.strip())
    except ValueError:
        raise LingmaoError(f'{key}: "{value}" is not a time of day like "22:00" or "07:30"') from None


@dataclass(frozen=True)
class NightWindow:
    """[start, end) in local time; end <= start means the window crosses midnight; no start/end or
    start == end means an empty window (never night)."""

    start: dt.time | None
    end: dt.time | None

    @property
    def empty(self) -> bool:
        return self.start is None or self.end is None or self.start == self.end

    def contains(self, t: dt.time) -> bool:
        if self.empty:
            return False
        assert self.start is not None and self.end is not None
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def __str__(self) -> str:
        if self.empty:
            return "empty window"
        assert self.start is not None and self.end is not None
        return f"{self.start.isoformat('minutes')}-{self.end.isoformat('minutes')}"


def local_time() -> dt.time:
    """The local time of day: night mode's clock unless `night.now` fixes one."""
    return dt.datetime.now().time()


def make_clock(now: Any) -> Clock:
    """`night.now`: null = the local time; "23:30" = always 23:30 (to try night mode in the daytime)."""
    if isinstance(now, Sequence) and not isinstance(now, str):
        raise LingmaoError('night.now: one time of day like "23:30" (or null for the local clock), not a list')
    fixed = parse_time(now, "night.now")
    if fixed is None:
        return lambda: local_time()  # looked up at each reading
    return lambda: fixed


# ----------------------------------------------------------------------------------------------
# Settings and the arithmetic of a switch
# ----------------------------------------------------------------------------------------------
@dataclass
class NightConfig:
    """Night mode: between start and end (local time) the run slows down and leaves the machine quieter."""

    KEY: ClassVar[str] = "night"
    enabled: bool = True
    start: str | None = "22:00"  # local time, quoted in YAML; end before start = the window crosses midnight
    end: str | None = "07:00"  # start == end or null = an empty window: never night
    now: Any = None  # null = the local clock; "23:30" = pretend it is 23:30
    batch_size_factor: float = number(0.5, gt=0, le=1)  # batch size x this (never below 1)
    lr_factor: float = number(0.75, gt=0)
    keep_effective_batch: bool = False  # false = fewer samples per step; true = accumulate more batches instead
    cpu_fraction: float = number(0.5, gt=0, le=1)  # share of CPU threads (and cores, where the OS allows)
    gpu_memory_fraction: float = number(0.5, gt=0, le=1)  # share of CUDA/MPS memory; never above the hardware cap
    check_every_n_steps: int = number(0, ge=0)  # also check every N steps, for the thread/memory limits only

    def __post_init__(self) -> None:
        check_fields(self)
        self.window()
        make_clock(self.now)

    def window(self) -> NightWindow:
        return NightWindow(parse_time(self.start, "night.start"), parse_time(self.end, "night.end"))


def night_batch_size(day_batch: int, factor: float) -> int:
    """The batch size at night: day batch x factor, rounded down, never below 1."""
    return max(1, int(day_batch * factor))


def night_accumulation(day_batch: int, day_accumulation: int, night_batch: int) -> int:
    """Accumulation that keeps samples per optimizer step as close to the day's as whole batches allow."""
    return max(1, round(day_batch * day_accumulation / night_batch))


# ----------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------
class NightMode(L.Callback):
    """Reads the clock at the start and at every epoch boundary and switches night mode on or off.

    Disabled (`enabled=False`), it only resets the learning-rate scale a checkpoint may carry from a night.
    Logs the metric `night` (1 while the night limits hold) every training step, and keeps a record of every
    switch (`history`, saved in checkpoints) for the run summary (`summary_rows`).
    """

    def __init__(
        self, config: NightConfig | None = None, gpu_memory_fraction: float | None = None, clock: Clock | None = None
    ) -> None:
        """`gpu_memory_fraction`: the run's own cap (hardware.gpu_memory_fraction), which night mode never exceeds;
        `clock`: what tells the time (default: `config.now`, else the local clock)."""
        self.settings = config if config is not None else NightConfig()
        self.window = self.settings.window()
        self.clock = clock or make_clock(self.settings.now)
        self.enabled = self.settings.enabled and not self.window.empty
        self.limits = ProcessLimits(self.settings.cpu_fraction, self.settings.gpu_memory_fraction, gpu_memory_fraction)
        self.night = False  # batch size, accumulation and learning rate are the night's
        self.day_batch: int | None = None
        self.day_accumulation = 1
        # What changed, step by step: {"step", "night", "limits" (the state after it), "changes"}; step None =
        # at the start of training (the step is known once a checkpoint is restored).
        self.history: list[dict[str, Any]] = []
        self._datamodule: Any = None
        self._user_reload = 0
        self._last_checked_step = -1
        self._restored = 0  # events of the history that came from the checkpoint

    # -- reading the clock ---------------------------------------------------------------------
    def _is_night(self, trainer: L.Trainer) -> tuple[bool, dt.time]:
        now = self.clock()
        # All processes of a multi-device run must agree, or their batch counts would differ.
        now = trainer.strategy.broadcast(now, src=0)
        return self.window.contains(now), now

    # -- the switch ----------------------------------------------------------------------------
    def batch_size(self, night: bool) -> int | None:
        if self.day_batch is None:
            return None
        return night_batch_size(self.day_batch, self.settings.batch_size_factor) if night else self.day_batch

    def accumulation(self, night: bool) -> int:
        if not (night and self.settings.keep_effective_batch and self.day_batch):
            return self.day_accumulation
        return night_accumulation(self.day_batch, self.day_accumulation, self.batch_size(True))

    def lr_scale(self, night: bool | None = None) -> float:
        return self.settings.lr_factor if (self.night if night is None else night) else 1.0

    def _switch(self, trainer: L.Trainer, pl_module: L.LightningModule | None, night: bool, now: dt.time) -> None:
        """Switch batch size, accumulation, learning rate (pl_module=None: at train start) and limits."""
        changes = []
        old_batch, new_batch = self.batch_size(self.night), self.batch_size(night)
        if new_batch is not None and new_batch != old_batch:
            self._datamodule.batch_size = new_batch
            if pl_module is not None:  # at setup no loader exists yet
                trainer.reload_dataloaders_every_n_epochs = 1  # rebuild the train loader before the next epoch
            changes.append(f"batch {old_batch}->{new_batch}")
        old_acc, new_acc = self.accumulation(self.night), self.accumulation(night)
        if old_acc != new_acc:
            trainer.accumulate_grad_batches = new_acc
            changes.append(f"accumulation {old_acc}->{new_acc}")
        changes.append(f"lr x{self.lr_scale(night):g}")
        self.night = night
        if pl_module is not None:
            _set_lr_scale(pl_module, self.lr_scale())
        changes += self.limits.set(night)
        if new_batch is not None:
            changes.append(f"samples/step {old_batch * old_acc}->{new_batch * new_acc}")
        log.info("night mode %s (%s): %s", "on" if night else "off", now.isoformat("minutes"), ", ".join(changes))
        self._record(None if pl_module is None else trainer.global_step, changes)

    def _set_limits(self, trainer: L.Trainer, night: bool, now: dt.time, note: str = "") -> None:
        """Move the thread / memory limits alone."""
        changes = self.limits.set(night)
        if changes:
            log.info("night mode limits %s (%s): %s%s", "on" if night else "off", now.isoformat("minutes"),
                     ", ".join(changes), note)
            self._record(trainer.global_step, changes)

    def _record(self, step: int | None, changes: list[str]) -> None:
        shown = [c for c in changes if not c.startswith(("samples/step", "cpus"))]
        self.history.append({"step": step, "night": self.night, "limits": self.limits.active,
                             "changes": ", ".join(shown)})

    # -- what the run summary says -------------------------------------------------------------
    def summary_rows(self, last_step: int) -> list[str]:
        """One line per stretch of the run that night mode changed: from which step to which, and what, e.g.
        `steps 0-135 (the end): batch 16->8, lr x0.75, threads 2->1`. Empty when it changed nothing."""
        spans: list[dict[str, Any]] = []
        for event in self.history:
            step = int(event["step"] or 0)
            open_span = spans[-1] if spans and spans[-1]["end"] is None else None
            if event["night"] or event["limits"]:
                if open_span is None:
                    open_span = {"start": step, "end": None, "changes": [], "seen": set()}
                    spans.append(open_span)
                if event["changes"] not in open_span["seen"]:  # a resumed night repeats its switch
                    open_span["seen"].add(event["changes"])
                    at = "" if step == open_span["start"] else f" (from step {step})"
                    open_span["changes"].append(event["changes"] + at)
            elif open_span is not None:
                open_span["end"] = step
        lines = []
        for span in spans:
            end = f"{span['end']}" if span["end"] is not None else f"{last_step} (the end)"
            lines.append(f"steps {span['start']}-{end}: {'; '.join(span['changes'])}")
        return lines

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(e) for e in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restored after setup: the earlier processes' record comes first.
        saved = [dict(e) for e in state_dict.get("history", [])]
        self.history = saved + self.history
        self._restored = len(saved)

    # -- hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.limits.capture(trainer.strategy.root_device)
        self._datamodule = trainer.datamodule
        batch = getattr(self._datamodule, "batch_size", None)
        self.day_batch = int(batch) if isinstance(batch, int) and not isinstance(batch, bool) else None
        self.day_accumulation = int(trainer.accumulate_grad_batches)
        self._user_reload = trainer.reload_dataloaders_every_n_epochs
        self.night = False
        self.history, self._restored = [], 0
        if not self.enabled:
            return
        if self.day_batch is None:
            log.warning("night mode: the run has no datamodule with a batch_size; the batch size stays as it is")
        night, now = self._is_night(trainer)
        log.info("night mode: window %s, clock %s: %s", self.window, now.isoformat("minutes"),
                 "night" if night else "day")
        if night:
            self._switch(trainer, None, True, now)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the checkpoint is restored: its schedule may carry the scale of another time of day.
        _set_lr_scale(pl_module, self.lr_scale())
        for event in self.history:
            if event["step"] is None:
                event["step"] = trainer.global_step
        last_saved = self.history[self._restored - 1] if self._restored else None
        if last_saved and (last_saved["night"] or last_saved["limits"]) and not (self.night or self.limits.active):
            # The saved run was in night mode and this process starts in the daytime.
            self.history.insert(self._restored, {"step": trainer.global_step, "night": False, "limits": False,
                                                 "changes": ""})

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The loader was rebuilt (if a switch asked for it) just before this hook; stop reloading.
        trainer.reload_dataloaders_every_n_epochs = self._user_reload

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self.enabled:
            return
        if logs_this_step(trainer):
            pl_module.log("night", float(self.limits.active), on_step=True, on_epoch=False)
        every = self.settings.check_every_n_steps
        step = trainer.global_step
        if not every or step == self._last_checked_step or step % every:
            return
        self._last_checked_step = step
        night, now = self._is_night(trainer)
        self._set_limits(trainer, night, now, "; batch size and lr follow at the next epoch")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not _another_epoch_follows(trainer):
            return
        night, now = self._is_night(trainer)
        if night != self.night:
            self._switch(trainer, pl_module, night, now)
        else:
            self._set_limits(trainer, night, now)  # a step check may have moved the limits alone

    def _restore(self, trainer: L.Trainer) -> None:
        self.limits.set(False)
        if self.night:
            if self.day_batch is not None:
                self._datamodule.batch_size = self.day_batch
            trainer.accumulate_grad_batches = self.day_accumulation
            self.night = False
        trainer.reload_dataloaders_every_n_epochs = self._user_reload

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore(trainer)


def _set_lr_scale(pl_module: L.LightningModule, scale: float) -> None:
    setter = getattr(pl_module, "set_lr_scale", None)
    if setter is not None:
        setter(scale)


def _another_epoch_follows(trainer: L.Trainer) -> bool:
    if trainer.should_stop:
        return False
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return False
    return trainer.max_epochs in (None, -1) or trainer.current_epoch + 1 < trainer.max_epochs
