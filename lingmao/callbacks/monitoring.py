"""What a run measures while it trains: throughput, MFU, gradient norm, learning rates, train perplexity, best
validation, times.

Per-step cost is a few integer additions: timings, norms and conversions to Python numbers happen only on
logging steps (every `trainer.log_every_n_steps` optimizer steps), where Lightning synchronises with the
device anyway.

MFU = achieved model FLOP/s / the device's dense peak FLOP/s at the run's precision (`lingmao.peak_flops`, the
table the benchmarks use too; `logger.peak_tflops` overrides it). A training step costs `model.flops_per_token(T)`
FLOPs per token: 6 N + 12 L T d, the PaLM paper's count (appendix B).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch

from lingmao.peak_flops import peak_tflops

log = logging.getLogger("lingmao.progress")


def logs_this_step(trainer: L.Trainer | None) -> bool:
    """Whether the loggers write the training step now running (`trainer.log_every_n_steps`).

    `LightningModule.log` costs about a millisecond of Python per call, and only these steps' values are
    written, so per-step metrics are logged on these steps alone."""
    if trainer is None:
        return True
    return trainer.fast_dev_run or (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0


def total_grad_norm(module: torch.nn.Module) -> torch.Tensor | None:
    """The 2-norm of all gradients of `module` together (None before any); under FSDP, of the whole gradients,
    not of this rank's shards (a DTensor's norm is computed across its ranks)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    return total.full_tensor() if hasattr(total, "full_tensor") else total


class TrainingMonitor(L.Callback):
    """Logs grad_norm (before clipping), train/ppl, tokens_per_sec, samples_per_sec and, on CUDA, achieved
    TFLOP/s, MFU and peak memory, on logging steps only; tracks totals for the end-of-run summary.

    Totals are kept in checkpoints, so they add up across resumes: `wall_seconds` and `train_seconds` count the
    time it took to reach the saved state (work lost after the last checkpoint is not counted); training time
    leaves out validation, plots and checkpoint writing, so it never exceeds the wall time. `session` counts the
    processes that worked on the run; it is logged with the training metrics (the plot marks where it changes).
    """

    def __init__(self, peak_tflops: float | None = None) -> None:
        self.peak_override = peak_tflops
        self.peak_flops: float | None = None
        self.flops_per_token: int | None = None
        # Totals over the whole run, as of the last checkpoint this process restored.
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.wall_before = 0.0
        self.session = 1
        self.best: dict[str, float] = {}
        # This process only.
        self.session_tokens = 0
        self.session_seconds = 0.0
        self.fit_started = time.perf_counter()
        # The current logging window.
        self._window_start = 0.0
        self._window_tokens = 0
        self._window_samples = 0
        self._window_steps = 0
        self._paused_at: float | None = None
        self._last_step = -1
        self._seq_len = 0
        self._world = 1
        self.latest: dict[str, float] = {}  # latest values, for the progress output

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        tokens, seconds = self._open_window()
        return {
            "tokens_seen": self.tokens_seen + tokens, "train_seconds": self.train_seconds + seconds,
            "wall_seconds": self.wall_seconds, "session": self.session, "best": dict(self.best),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))
        self.wall_before = float(state_dict.get("wall_seconds", 0.0))
        self.session = int(state_dict.get("session", 1)) + 1
        self.best = dict(state_dict.get("best", {}))

    @property
    def wall_seconds(self) -> float:
        """Wall time of the whole run: earlier sessions (up to their checkpoint) and this one."""
        return self.wall_before + time.perf_counter() - self.fit_started

    @property
    def session_wall_seconds(self) -> float:
        return time.perf_counter() - self.fit_started

    def _open_window(self) -> tuple[int, float]:
        """Tokens and training seconds of the current, not yet logged window."""
        if not self._window_steps:
            return 0, 0.0
        end = self._paused_at if self._paused_at is not None else time.perf_counter()
        return self._window_tokens * self._world, max(0.0, end - self._window_start)

    # -- hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_started = time.perf_counter()
        self._world = trainer.world_size

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak = self.peak_override or peak_tflops(name, trainer.precision, torch.get_float32_matmul_precision())
            self.peak_flops = peak * 1e12 if peak else None
            if self.peak_flops is None:
                log.info("%s at %s is not in lingmao's peak-FLOP table: logging achieved TFLOP/s without MFU "
                         "(set logger.peak_tflops to get MFU)", name, trainer.precision)
            torch.cuda.reset_peak_memory_stats(device)
        self._last_step = trainer.global_step
        self._window_start = self._paused_at = time.perf_counter()  # the window opens at the first batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        if self._paused_at is not None:  # leave out validation, plots, checkpoints written meanwhile
            self._window_start += time.perf_counter() - self._paused_at
            self._paused_at = None
        x = batch[0] if isinstance(batch, tuple | list) else batch
        if isinstance(x, torch.Tensor):  # shape only: no device access
            self._window_samples += x.shape[0]
            self._window_tokens += x.numel()
            self._seq_len = x.shape[-1]

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not logs_this_step(trainer):
            return
        total = total_grad_norm(pl_module)
        if total is not None:
            pl_module.log("grad_norm", total, on_step=True, on_epoch=False)
        # The rates this very step uses, in its own row. (Lightning's LearningRateMonitor reads them in
        # on_train_batch_start, before the module's hook of that name sets them, and labels its rows apart.)
        groups = optimizer.param_groups
        rates = {"lr": float(groups[0]["lr"])}
        for i, group in enumerate(groups[1:], start=1):
            if group["lr"] != groups[0]["lr"]:
                rates[f"lr/{group.get('name', i)}"] = float(group["lr"])
        pl_module.log_dict(rates, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_step:  # inside a gradient-accumulation cycle
            return
        self._last_step = trainer.global_step
        self._window_steps += 1
        if trainer.global_step % max(1, trainer.log_every_n_steps):
            return
        device = trainer.strategy.root_device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)  # logging syncs here anyway
        tokens, seconds = self._open_window()
        seconds = max(seconds, 1e-9)
        self.tokens_seen += tokens
        self.train_seconds += seconds
        self.session_tokens += tokens
        self.session_seconds += seconds
        metrics: dict[str, float] = {
            "tokens_per_sec": tokens / seconds,
            "samples_per_sec": self._window_samples * self._world / seconds,
            "session": float(self.session),
        }
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            loss_value = float(loss)
            metrics["train/ppl"] = math.exp(min(loss_value, 50.0))
            self.latest["loss"] = loss_value
        if self.flops_per_token is None and self._seq_len:
            count = getattr(getattr(pl_module, "model", pl_module), "flops_per_token", None)
            self.flops_per_token = count(self._seq_len) if callable(count) else None
        if self.flops_per_token and cuda:
            achieved = self.flops_per_token * metrics["tokens_per_sec"]
            metrics["tflops"] = achieved / 1e12
            if self.peak_flops:
                metrics["mfu"] = achieved / (self.peak_flops * self._world)
            metrics["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self.latest.update(metrics)
        self.latest["lr"] = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else 0.0
        total = trainer.estimated_stepping_batches
        steps_per_sec = self._window_steps / seconds
        if math.isfinite(total) and steps_per_sec > 0:
            self.latest["eta"] = max(0.0, (total - trainer.global_step) / steps_per_sec)
        self._window_start = time.perf_counter()
        self._window_tokens = self._window_samples = self._window_steps = 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tokens, seconds = self._open_window()  # the last, unlogged part of a window still counts
        self.tokens_seen += tokens
        self.session_tokens += tokens
        self.train_seconds += seconds
        self.session_seconds += seconds
        self._window_tokens = self._window_samples = self._window_steps = 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation is not training time: the window pauses until the next training batch.
        if self._paused_at is None:
            self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.latest.update(metrics)
        loss = metrics.get("val/loss")
        if loss is not None and loss < self.best.get("val/loss", math.inf):
            self.best = {**metrics, "step": float(trainer.global_step)}
