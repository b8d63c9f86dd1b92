"""For the machine the run shares: a GPU memory cap and periodic allocator-cache clearing (no-ops when off)."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


class GPUMemoryCap(L.Callback):
    """Caps this process's share of its CUDA device memory (`torch.cuda.set_per_process_memory_fraction`).

    Set at setup on the device of this process: in a multi-device run every process caps its own device, so
    every device the run uses is capped. Allocations beyond the cap raise CUDA out-of-memory.
    """

    def __init__(self, fraction: float | None = None) -> None:
        self.fraction = fraction
        self._applied_to: torch.device | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        if self.fraction is None or self._applied_to == device:
            return
        self._applied_to = device
        if device.type != "cuda":
            log.info("hardware.gpu_memory_fraction=%g does not apply on %s; ignored", self.fraction, device.type)
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(self.fraction, index)
        log.info("GPU memory cap: %.0f%% of cuda:%d (hardware.gpu_memory_fraction)", self.fraction * 100, index)


def empty_cache(device_type: str) -> bool:
    """Release the cached, unused blocks of the allocator of `device_type`; False where there is none (CPU)."""
    if device_type == "cuda":
        torch.cuda.empty_cache()
    elif device_type == "mps":
        torch.mps.empty_cache()
    else:
        return False
    return True


class CacheCleaner(L.Callback):
    """Frees the CUDA/MPS allocator cache every `every_n_steps` optimizer steps (a no-op on CPU).

    Counted in optimizer steps (`trainer.global_step`), so with gradient accumulation it runs once per step.
    """

    def __init__(self, every_n_steps: int = 0) -> None:
        self.every_n_steps = every_n_steps
        self.device_type = "cpu"
        self._active = False
        self._last_step = -1
        self.calls = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.device_type = trainer.strategy.root_device.type
        self._active = bool(self.every_n_steps) and self.device_type in ("cuda", "mps")
        if self.every_n_steps and not self._active:
            log.info("hardware.empty_cache_every_n_steps: nothing to free on %s; ignored", self.device_type)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._active:
            return
        step = trainer.global_step
        if step == self._last_step or step == 0 or step % self.every_n_steps:
            return
        self._last_step = step
        empty_cache(self.device_type)
        self.calls += 1
