"""What a user watching a run sees: throughput, MFU, gradient norm, progress output, loggers, summary.

Per-step cost is kept to a few integer additions: timings, norms and conversions to Python numbers
happen only on logging steps (every `trainer.log_every_n_steps` optimizer steps), where Lightning
synchronises with the device anyway.

FLOPs: a training step costs about `6 * N + 12 * L * T * d` FLOPs per token (the PaLM paper's count,
appendix B), where N is the number of weights that take part in matrix multiplies,
`N = L * (4 d^2 + 2 d f) + d V` (attention projections, feed-forward, output head; not the embedding
lookup, norms or biases), L layers, d = d_model, f = dim_feedforward, V the vocabulary and T the
context length. The second term is attention itself (QK^T and AV, forward and backward, counted over
the full T x T square). MFU = achieved FLOP/s / the device's peak dense bf16 FLOP/s (`PEAK_TFLOPS`).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lingmao.errors import LingmaoError

log = logging.getLogger("lingmao.progress")

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s per device, from NVIDIA's data sheets (the
# "with sparsity" figures halved); fp16 for chips without bf16 (V100, T4). Keys are matched against
# the lower-cased `torch.cuda.get_device_name()`, longest key first.
PEAK_TFLOPS: dict[str, float] = {
    "h200": 989.0,
    "gh200": 989.0,
    "h100 nvl": 835.0,
    "h100 pcie": 756.0,
    "h100": 989.0,  # SXM ("NVIDIA H100 80GB HBM3")
    "a100": 312.0,  # SXM and PCIe
    "l40s": 362.0,
    "l40": 181.0,
    "l4": 121.0,
    "a10": 125.0,
    "rtx 4090": 165.0,
    "v100": 125.0,
    "t4": 65.0,
}


# ----------------------------------------------------------------------------------------------
# FLOPs and MFU
# ----------------------------------------------------------------------------------------------
def matmul_params(d_model: int, num_layers: int, dim_feedforward: int, vocab_size: int) -> int:
    """Weights that take part in matrix multiplies: attention (4 d^2) and feed-forward (2 d f) per layer, head (d V)."""
    return num_layers * (4 * d_model * d_model + 2 * d_model * dim_feedforward) + d_model * vocab_size


def train_flops_per_token(d_model: int, num_layers: int, dim_feedforward: int, vocab_size: int, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token: 6 N + 12 L T d (see the module docstring)."""
    n = matmul_params(d_model, num_layers, dim_feedforward, vocab_size)
    return 6 * n + 12 * num_layers * seq_len * d_model


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> int | None:
    """`train_flops_per_token` for a `SimpleTransformer` (None for a model of another shape)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    try:
        layers = model.transformer.layers
        return train_flops_per_token(
            model.d_model, len(layers), layers[0].linear1.out_features, model.vocab_size, seq_len
        )
    except AttributeError:
        return None


def peak_tflops(device_name: str) -> float | None:
    """The table's peak for a CUDA device name, or None when the device is not in it."""
    name = device_name.lower()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


# ----------------------------------------------------------------------------------------------
# The metrics callback
# ----------------------------------------------------------------------------------------------
class TrainingMonitor(L.Callback):
    """Logs lr, grad_norm (before clipping), train/ppl, tokens_per_sec, samples_per_sec and, on CUDA,
    achieved TFLOP/s, MFU and peak memory, on logging steps only; tracks totals for the summary.

    Timing uses `time.perf_counter` at batch boundaries; time spent in validation is left out.
    """

    def __init__(self, peak_tflops: float | None = None) -> None:
        self.peak_override = peak_tflops
        self.peak: float | None = None
        self.flops_per_token: int | None = None
        # Totals over the whole run (kept in checkpoints, so they survive a resume).
        self.tokens_seen = 0
        self.train_seconds = 0.0
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
        self._stepped = False
        self._logging = False
        self._seq_len = 0
        # Latest values, for the progress output.
        self.latest: dict[str, float] = {}

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds, "best": dict(self.best)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))
        self.best = dict(state_dict.get("best", {}))

    # -- hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_started = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.strategy.root_device.type == "cuda":
            name = torch.cuda.get_device_name(trainer.strategy.root_device)
            self.peak = self.peak_override or peak_tflops(name)
            if self.peak is None:
                log.info("%s is not in the peak-FLOP table: logging achieved TFLOP/s without MFU "
                         "(set logger.peak_tflops to get MFU)", name)
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        self._window_start = self._paused_at = time.perf_counter()  # the window opens at the first batch

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._paused_at is not None:  # leave out validation, plots, checkpoints written meanwhile
            self._window_start += time.perf_counter() - self._paused_at
            self._paused_at = None
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(x, torch.Tensor):  # shape only: no device access
            self._window_samples += x.shape[0]
            self._window_tokens += x.numel()
            self._seq_len = x.shape[-1]

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._stepped = True
        self._logging = trainer._logger_connector.should_update_logs
        if not self._logging:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach(), 2.0) for g in grads]))
            pl_module.log("grad_norm", norm, on_step=True, on_epoch=False)
        pl_module.log("lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._stepped:  # inside a gradient-accumulation cycle
            return
        self._stepped = False
        self._window_steps += 1
        if not self._logging:
            return
        cuda = trainer.strategy.root_device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(trainer.strategy.root_device)  # logging syncs here anyway
        now = time.perf_counter()
        seconds = max(now - self._window_start, 1e-9)
        world = trainer.world_size
        tokens = self._window_tokens * world
        self.tokens_seen += tokens
        self.train_seconds += seconds
        self.session_tokens += tokens
        self.session_seconds += seconds
        metrics: dict[str, float] = {
            "tokens_per_sec": tokens / seconds,
            "samples_per_sec": self._window_samples * world / seconds,
        }
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            loss_value = float(loss)
            metrics["train/ppl"] = math.exp(min(loss_value, 50.0))
            self.latest["loss"] = loss_value
        if self.flops_per_token is None and self._seq_len:
            self.flops_per_token = model_flops_per_token(getattr(pl_module, "model", pl_module), self._seq_len)
        if self.flops_per_token and cuda:
            tflops = self.flops_per_token * metrics["tokens_per_sec"] / 1e12
            metrics["tflops"] = tflops
            if self.peak:
                metrics["mfu"] = tflops / (self.peak * world)
            metrics["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**30
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
        # The last, unlogged part of a window still counts towards the totals.
        if self._window_steps:
            tokens = self._window_tokens * trainer.world_size
            seconds = (self._paused_at or time.perf_counter()) - self._window_start
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
        for key, value in metrics.items():
            self.latest[key] = value
        loss = metrics.get("val/loss")
        if loss is not None and loss < self.best.get("val/loss", math.inf):
            self.best = {**metrics, "step": float(trainer.global_step)}


class TrainingPlots(L.Callback):
    """Redraw `<run dir>/plots/training.png` (lingmao.plot) after each validation and at the end of training."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def _draw(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
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


def find_callback(trainer: L.Trainer, kind: type) -> Any:
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


# ----------------------------------------------------------------------------------------------
# Progress output
# ----------------------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _progress_fields(latest: Mapping[str, float]) -> dict[str, str]:
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

    def __init__(self, monitor: TrainingMonitor, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.monitor = monitor

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        items.update(_progress_fields(self.monitor.latest))
        return items


class LineProgress(L.Callback):
    """For logs (no terminal): one line every `every_n_steps` optimizer steps and one per validation."""

    def __init__(self, monitor: TrainingMonitor, every_n_steps: int = 50) -> None:
        self.monitor = monitor
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
        fields = _progress_fields(self.monitor.latest)
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


def progress_callbacks(logger_cfg: Mapping[str, Any], monitor: TrainingMonitor, enabled: bool) -> list[L.Callback]:
    """A tqdm bar on a terminal, else quiet progress lines; nothing when progress output is off."""
    if not enabled:
        return []
    if is_terminal():
        return [TerminalProgressBar(monitor, int(logger_cfg.get("progress_refresh_rate") or 1))]
    return [LineProgress(monitor, int(logger_cfg.get("progress_every_n_steps") or 50))]


# ----------------------------------------------------------------------------------------------
# Loggers
# ----------------------------------------------------------------------------------------------
class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run must append to it instead."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))

    def _check_log_dir_exists(self) -> None:  # the parent warns and deletes metrics.csv here
        pass


class AppendingCSVLogger(CSVLogger):
    """`CSVLogger` writing `<save_dir>/metrics.csv`, appending when the file exists (resumed runs)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def build_loggers(logger_cfg: Mapping[str, Any], run_dir: Path) -> list[Logger]:
    """CSV always (`<run dir>/metrics.csv`); TensorBoard too with `logger=tensorboard`."""
    loggers: list[Logger] = [AppendingCSVLogger(save_dir=str(run_dir), name="", version="")]
    if logger_cfg.get("tensorboard"):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise LingmaoError(
                "logger=tensorboard needs the 'tensorboard' package: pip install tensorboard (or use logger=csv)"
            ) from None
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    return loggers


# ----------------------------------------------------------------------------------------------
# Config tree and end-of-run summary
# ----------------------------------------------------------------------------------------------
def _plain(cfg: DictConfig) -> Any:
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # an interpolation that cannot resolve yet: show it unresolved
        return OmegaConf.to_container(cfg, resolve=False)


def config_tree(cfg: DictConfig) -> str:
    """The composed config as an indented tree (resolved where possible)."""
    lines = ["config"]

    def walk(node: Any, prefix: str) -> None:
        items = list(node.items()) if isinstance(node, dict) else []
        for i, (key, value) in enumerate(items):
            last = i == len(items) - 1
            branch, cont = ("└── ", "    ") if last else ("├── ", "│   ")
            if isinstance(value, dict) and value:
                lines.append(f"{prefix}{branch}{key}")
                walk(value, prefix + cont)
            else:
                lines.append(f"{prefix}{branch}{key}: {value}")

    walk(_plain(cfg), "")
    return "\n".join(lines)


def save_config(cfg: DictConfig, run_dir: Path) -> Path:
    """Write the resolved config to `<run dir>/config.yaml` (Hydra's copy lives in its own dated directory)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(_plain(cfg))), encoding="utf-8")
    return path


def format_table(rows: list[tuple[str, str]], title: str = "") -> str:
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    rule = "─" * (width + vwidth + 3)
    out = [title, rule] if title else [rule]
    out += [f"{k:<{width}}   {v}" for k, v in rows]
    out.append(rule)
    return "\n".join(out)


def run_summary(trainer: L.Trainer, checkpoint: str | Path | None = None, export: str | Path | None = None) -> str:
    """One table: steps, epochs, wall time, tokens seen, mean tokens/s, best validation, where the files are."""
    monitor: TrainingMonitor | None = find_callback(trainer, TrainingMonitor)
    rows: list[tuple[str, str]] = [("steps", f"{trainer.global_step:,}")]
    batches = trainer.num_training_batches
    if isinstance(batches, int) and batches > 0:
        epochs = trainer.global_step * trainer.accumulate_grad_batches / batches
        rows.append(("epochs", f"{epochs:.2f}"))
    if monitor is not None:
        rows.append(("wall time", format_duration(time.perf_counter() - monitor.fit_started)))
        rows.append(("training time", format_duration(monitor.train_seconds) + " (without validation)"))
        rows.append(("tokens seen", f"{monitor.tokens_seen:,}"))
        if monitor.session_seconds > 0:
            rows.append(("mean tokens/s", f"{monitor.session_tokens / monitor.session_seconds:,.0f}"))
        best = monitor.best
        if best:
            parts = [f"loss {best['val/loss']:.4f}"]
            if "val/ppl" in best:
                parts.append(f"ppl {best['val/ppl']:.2f}")
            if "val/bpc" in best:
                parts.append(f"bpc {best['val/bpc']:.3f}")
            rows.append(("best validation", ", ".join(parts) + f" (step {int(best.get('step', 0))})"))
    if checkpoint:
        rows.append(("checkpoint", str(checkpoint)))
    if export:
        rows.append(("export", str(export)))
    if trainer.loggers:
        rows.append(("metrics", str(Path(trainer.loggers[0].log_dir or ".") / "metrics.csv")))
    return format_table(rows, "run summary")


def tokens_per_char(dataset: Any) -> float | None:
    """Tokens per character of a tokenized file (for bits per character), or None when unknown."""
    chars = getattr(dataset, "num_chars", None)
    tokens = getattr(dataset, "tokens", None)
    if not chars or tokens is None:
        return None
    return len(tokens) / chars


# ----------------------------------------------------------------------------------------------
# Wiring (called from lingmao.train)
# ----------------------------------------------------------------------------------------------
def build_monitoring(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    """The metrics callback, the progress output that suits stdout, and the plots."""
    logger_cfg = cfg.get("logger") or {}
    monitor = TrainingMonitor(peak_tflops=logger_cfg.get("peak_tflops"))
    callbacks: list[L.Callback] = [monitor]
    callbacks += progress_callbacks(logger_cfg, monitor, bool(cfg.trainer.get("enable_progress_bar", True)))
    if logger_cfg.get("plots", True):
        callbacks.append(TrainingPlots(run_dir))
    return callbacks


@rank_zero_only
def announce_config(cfg: DictConfig, run_dir: Path) -> None:
    """Save the resolved config into the run directory and print it as a tree."""
    path = save_config(cfg, run_dir)
    if (cfg.get("logger") or {}).get("print_config", True):
        log.info("%s\n(saved to %s)", config_tree(cfg), path)


@rank_zero_only
def log_summary(trainer: L.Trainer, export: str | Path | None = None) -> None:
    """Print the end-of-run table (checkpoint: the newest `last.ckpt` written)."""
    ckpt = getattr(trainer.checkpoint_callback, "last_model_path", None) or None
    log.info("\n%s", run_summary(trainer, ckpt, export))
