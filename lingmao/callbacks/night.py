"""Night mode: between `night.start` and `night.end` (local time) the run slows down and leaves the machine quieter.

While the window holds: smaller batches (`batch_size_factor`), a lower learning rate (`lr_factor`), and process
limits: on CPU fewer torch threads and CPU cores (`cpu_fraction`), on CUDA a smaller share of the GPU memory
(`gpu_memory_fraction`), on MPS a lower MPS memory limit and fewer threads. The clock is read at the start of
training and at every epoch boundary (and every `check_every_n_steps` optimizer steps for the limits only), so a
run that spans the evening enters and leaves night mode on its own. Batch size, accumulation and learning rate
change only at epoch boundaries; the train DataLoader is rebuilt there when the batch size changes.

Nothing is taken from the checkpoint: a resumed run applies the state for the time it resumes at.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from omegaconf import ListConfig, OmegaConf

from lingmao.callbacks.monitoring import logs_this_step
from lingmao.checks import check_fields, number
from lingmao.errors import LingmaoError

log = logging.getLogger(__name__)

Clock = Callable[[], dt.time]

# torch's default MPS limit when PYTORCH_MPS_HIGH_WATERMARK_RATIO is not set (see torch.mps docs).
MPS_DEFAULT_HIGH_WATERMARK = 1.7


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


def real_clock() -> dt.time:
    return dt.datetime.now().time()


class ScriptedClock:
    """A clock that says `times[0]` at the first reading, `times[1]` at the second, ... and then keeps
    saying the last one (`night.now: ["21:59", "22:00"]`: day for the first epoch, night from the second)."""

    def __init__(self, times: Sequence[dt.time]) -> None:
        if not times:
            raise ValueError("ScriptedClock needs at least one time")
        self.times = list(times)
        self.readings = 0

    def __call__(self) -> dt.time:
        t = self.times[min(self.readings, len(self.times) - 1)]
        self.readings += 1
        return t


def make_clock(now: Any) -> Clock:
    """`night.now`: null = the real local time; "23:30" = always 23:30; a list = one time per reading."""
    if now is None:
        return real_clock
    if isinstance(now, ListConfig):
        now = OmegaConf.to_container(now)
    if isinstance(now, (list, tuple)):
        if not now:
            raise LingmaoError("night.now: an empty list; give a time like \"23:30\", a list of times, or null")
        return ScriptedClock([parse_time(v, f"night.now[{i}]") for i, v in enumerate(now)])
    fixed = parse_time(now, "night.now")
    if fixed is None:
        return real_clock
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
    now: Any = None  # null = the local clock; "23:30" = pretend it is 23:30; ["21:59", "22:00"] = one per check
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
# Process limits: threads / CPU affinity / GPU memory
# ----------------------------------------------------------------------------------------------
def _thread_ids() -> list[int]:
    """Every thread of this process (Linux affinity is per thread; new threads inherit it)."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _set_affinity(cpus: set[int]) -> None:
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # a thread that just ended, or not permitted
            pass


class ProcessLimits:
    """Applies and lifts the limits of night mode for one device type.

    cpu:  torch intra-op threads x cpu_fraction, and the process's CPU affinity where the OS has it (Linux).
    cuda: torch.cuda.set_per_process_memory_fraction on the run's device (never above a hardware cap), and
          the cached blocks are released so the memory really goes back.
    mps:  torch.mps.set_per_process_memory_fraction (a share of Metal's recommended working set) and fewer
          torch threads; macOS has no CPU affinity call.
    """

    def __init__(self, cpu_fraction: float, gpu_memory_fraction: float, base_gpu_fraction: float | None = None):
        self.cpu_fraction = cpu_fraction
        self.gpu_memory_fraction = gpu_memory_fraction
        self.base_gpu_fraction = base_gpu_fraction
        self.device = torch.device("cpu")
        self.day_threads = torch.get_num_threads()
        self.day_cpus: set[int] | None = None
        self.active = False

    def capture(self, device: torch.device) -> None:
        """Remember the day settings (call before applying)."""
        self.device = device
        self.day_threads = torch.get_num_threads()
        self.day_cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None

    @property
    def limits_threads(self) -> bool:
        return self.device.type in ("cpu", "mps")

    def _gpu_fraction(self, night: bool) -> float:
        base = self.base_gpu_fraction if self.base_gpu_fraction is not None else 1.0
        return min(base, self.gpu_memory_fraction) if night else base

    def set(self, night: bool) -> list[str]:
        """Apply (night=True) or lift the limits; return what changed, as short phrases for the log."""
        if night == self.active:
            return []
        self.active = night
        changes: list[str] = []
        if self.limits_threads:
            before = torch.get_num_threads()
            after = max(1, int(self.day_threads * self.cpu_fraction)) if night else self.day_threads
            torch.set_num_threads(after)
            changes.append(f"threads {before}->{after}")
            if self.day_cpus is not None and hasattr(os, "sched_setaffinity") and len(self.day_cpus) > 1:
                cpus = (set(sorted(self.day_cpus)[: max(1, int(len(self.day_cpus) * self.cpu_fraction))])
                        if night else self.day_cpus)
                before_cpus = len(os.sched_getaffinity(0))
                _set_affinity(cpus)
                changes.append(f"cpus {before_cpus}->{len(cpus)}")
        if self.device.type == "cuda":
            before_f, after_f = self._gpu_fraction(not night), self._gpu_fraction(night)
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(after_f, index)
            if night:
                torch.cuda.empty_cache()
            changes.append(f"gpu memory {before_f:.0%}->{after_f:.0%}")
        elif self.device.type == "mps":
            # hardware.gpu_memory_fraction is a CUDA cap; MPS's day limit is torch's own.
            day = float(os.environ.get("PYTORCH_MPS_HIGH_WATERMARK_RATIO", MPS_DEFAULT_HIGH_WATERMARK))
            after_f = min(day, self.gpu_memory_fraction) if night else day
            torch.mps.set_per_process_memory_fraction(after_f)
            if night:
                torch.mps.empty_cache()
            changes.append(f"mps memory limit x{after_f:g}")
        return changes


# ----------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------
class NightMode(L.Callback):
    """Reads the clock at the start and at every epoch boundary and switches night mode on or off.

    Disabled (`enabled=False`), it only resets the learning-rate scale a checkpoint may carry from a night.
    Logs the metric `night` (1 while the night limits hold) every training step.
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
        self._datamodule: Any = None
        self._user_reload = 0
        self._last_checked_step = -1

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
        changes = self.limits.set(night)
        if changes:
            log.info("night mode limits %s (%s): %s; batch size and lr follow at the next epoch",
                     "on" if night else "off", now.isoformat("minutes"), ", ".join(changes))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not _another_epoch_follows(trainer):
            return
        night, now = self._is_night(trainer)
        if night != self.night:
            self._switch(trainer, pl_module, night, now)
        else:
            changes = self.limits.set(night)  # a step check may have moved the limits alone
            if changes:
                log.info("night mode limits %s (%s): %s", "on" if night else "off", now.isoformat("minutes"),
                         ", ".join(changes))

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
