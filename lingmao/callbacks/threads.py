"""CPU threads chosen by measurement, so that a shared machine does not slow training to a crawl.

On a CPU, torch's intra-op threads wait for each other at the end of every parallel region (OpenMP spins
while it waits). When another busy process holds one of the cores, every region waits for the thread that
shares a core with it: measured on 2 cores with one CPU-bound neighbour, 2 threads trained at about a quarter
of the speed of 1 thread, while on an idle machine 2 threads are faster. No fixed number is right for both.

`ThreadTuner` times a few optimizer steps at each candidate thread count (all cores of the process, half,
one), keeps the fastest, and measures again every `recheck_minutes`, since neighbours come and go. It does
nothing when `hardware.cpu_threads` fixes the number, off the CPU, or while night mode holds its own limit. With
several processes it does not tune: every rank takes rank 0's count (which `hardware.cpu_threads` sets, or
Lightning's launcher and torchrun: cores / processes, and one).
Thread counts change the order of floating-point sums, so runs that must repeat bit for bit set
`hardware.cpu_threads`.

A trial at a bad count is expensive (one step at two threads beside a neighbour costs about four at one), so
each round first tries the count of cores that other processes leave free (`free_cores`: the CPU time the
machine spent outside this process, from /proc/stat, over the previous step or a short look when training
starts), and a trial whose first step already takes `give_up_factor` times the best median so far stops there.
Beside one busy neighbour on two cores a round then costs one slow step instead of five.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


def candidate_threads(cores: int) -> list[int]:
    """All cores, half of them, one: fewest first is not needed, they are all tried."""
    return sorted({cores, max(1, cores // 2), 1}, reverse=True)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_sample() -> tuple[float, float, float] | None:
    """(seconds, busy CPU-seconds of this process's cores, CPU-seconds of this process) now, from /proc (Linux);
    None where it cannot be read. Two samples give the CPU time everything else used in between."""
    try:
        cores = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name in cores:  # user nice system idle iowait irq softirq steal: all but idle and iowait
                    values = [int(v) for v in fields[:8]]
                    busy += sum(values) - values[3] - values[4]
        tick = os.sysconf("SC_CLK_TCK")
        own = os.times()
        return time.perf_counter(), busy / tick, own.user + own.system
    except (OSError, ValueError, AttributeError):
        return None


def free_cores(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None,
               cores: int) -> int | None:
    """The cores other processes left free between two `cpu_sample`s (at least one), or None without samples."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    others = max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0])
    return min(cores, max(1, math.floor(cores - others + 0.5)))


class ThreadTuner(L.Callback):
    """See the module docstring. `steps_per_trial` optimizer steps are timed per candidate, after one step
    at it that is not counted (it pays for waking the threads) unless it is already too slow to win."""

    def __init__(self, fixed: int | None = None, steps_per_trial: int = 3, recheck_minutes: float = 10.0,
                 give_up_factor: float = 1.5) -> None:
        self.fixed = fixed
        self.steps_per_trial = max(1, int(steps_per_trial))
        self.recheck_seconds = recheck_minutes * 60
        self.give_up_factor = give_up_factor
        self.active = False
        self.chosen: int | None = None
        self.history: list[dict[int, float]] = []  # per tuning round: threads -> seconds per step
        self._queue: list[int] = []
        self._times: dict[int, list[float]] = {}
        self._current: int | None = None
        self._skip = 0
        self._last_end: float | None = None
        self._last_step = -1
        self._next_round = 0.0
        self._sample: tuple[float, float, float] | None = None  # cpu_sample() at the end of the last step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        cpu = trainer.strategy.root_device.type == "cpu"
        if cpu and trainer.world_size > 1:
            self.active = False
            self._agree(trainer)
            return
        self.active = stage == "fit" and self.fixed is None and cpu
        if self.active and len(candidate_threads(usable_cores())) < 2:
            self.active = False  # one core: nothing to choose

    def _agree(self, trainer: L.Trainer) -> None:
        """Several processes: every rank takes rank 0's thread count, and none tunes. (Timings taken while the ranks
        wait for each other in every step say little, and ranks that chose differently would sum in different
        orders.)"""
        # hardware.cpu_threads again: Lightning's launcher sets cores / processes when OMP_NUM_THREADS is unset
        threads = self.fixed or int(trainer.strategy.broadcast(torch.get_num_threads(), src=0))
        torch.set_num_threads(threads)
        if trainer.is_global_zero and self.chosen != threads:
            why = "hardware.cpu_threads" if self.fixed else (
                "rank 0's count: the thread tuner does not run with several processes; hardware.cpu_threads=N sets it")
            log.info("CPU threads: %d on each of the %d processes (%s)", threads, trainer.world_size, why)
        self.chosen = threads

    def _night_holds(self, trainer: L.Trainer) -> bool:
        return any(getattr(getattr(c, "limits", None), "active", False) for c in trainer.callbacks)

    def _start_round(self, free: int | None) -> None:
        """Trials of every candidate, the count of free cores (or the nearest candidate) first."""
        queue = candidate_threads(usable_cores())
        if free is not None:
            queue.sort(key=lambda n: abs(n - free))
        self._queue = queue
        self._times = {n: [] for n in self._queue}
        self._next_trial()

    def _next_trial(self) -> None:
        self._current = self._queue.pop(0)
        torch.set_num_threads(self._current)
        self._skip = 1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        self._last_step = trainer.global_step
        if self._night_holds(trainer):
            self._next_round = 0.0
            return
        before = cpu_sample()  # a short look at the machine, so that the very first step runs at a good count
        time.sleep(0.25)
        self._sample = cpu_sample()
        self._start_round(free_cores(before, self._sample, usable_cores()))
        self._last_end = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None  # time spent validating is not a step's

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self.active or trainer.global_step == self._last_step:  # inside an accumulation cycle
            return
        self._last_step = trainer.global_step
        now = time.perf_counter()
        took, self._last_end = (now - self._last_end if self._last_end is not None else None), now
        sample, self._sample = self._sample, cpu_sample()
        if self._night_holds(trainer):
            # Night mode sets the threads now: a round under way is dropped (its steps ran on another count), and
            # a new one starts with the first step of the day.
            self._current, self._next_round = None, 0.0
            return
        if self._current is None:
            if now >= self._next_round and not self._night_holds(trainer):
                self._start_round(free_cores(sample, self._sample, usable_cores()))
            return
        if self._skip:
            self._skip -= 1
            if took is not None and self._hopeless(took):
                self._times[self._current].append(took)
                if self._queue:
                    self._next_trial()
                else:
                    self._finish_round(now)
            return
        if took is not None:
            self._times[self._current].append(took)
        if len(self._times[self._current]) < self.steps_per_trial:
            return
        if self._queue:
            self._next_trial()
            return
        self._finish_round(now)

    def _hopeless(self, took: float) -> bool:
        """Whether a step this slow at the current count shows it cannot beat a count already measured."""
        best = [sorted(t)[len(t) // 2] for n, t in self._times.items() if t and n != self._current]
        return bool(best) and took > self.give_up_factor * min(best)

    def _finish_round(self, now: float) -> None:
        speeds = {n: sorted(t)[len(t) // 2] for n, t in self._times.items() if t}  # median seconds per step
        self.chosen = min(speeds, key=speeds.get)
        torch.set_num_threads(self.chosen)
        self.history.append(speeds)
        self._current = None
        self._next_round = now + self.recheck_seconds
        shown = ", ".join(f"{n}: {s * 1000:.0f} ms" for n, s in sorted(speeds.items(), reverse=True))
        log.info("CPU threads: %d (per step with %s; hardware.cpu_threads=N fixes it)", self.chosen, shown)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and self._current is not None and self.chosen is not None and not self._night_holds(trainer):
            torch.set_num_threads(self.chosen)  # a round cut short by the end of training
