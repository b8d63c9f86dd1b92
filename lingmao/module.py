"""`LingmaoLM`: the LightningModule around the model: loss, metrics, optimizer, learning-rate schedule.

The learning rate is set before every optimizer step from the config this run was started with: warm-up,
then cosine decay to a floor, over the run's progress (steps of `trainer.max_steps`, or epochs of
`trainer.max_epochs`, whichever ends the run first), times night mode's factor. A resumed run follows the
schedule its own command describes (raising `trainer.max_steps` to continue a finished run stretches the cosine
to the new end), with one thing kept from the checkpoint: the warm-up is the run's first, never longer, so a
resumed run never warms up again (docs/training.md).

Checkpoints also record the run's training config (`lingmao.runs`); a resume that was allowed to change the
optimizer (`resume_changed=accept`) starts the optimizer state afresh, and other accepted changes (weight decay,
betas, ...) take effect instead of being replaced by the checkpoint's values.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from lingmao.callbacks.monitoring import logs_this_step
from lingmao.checkpointing import META_KEY
from lingmao.model import ModelConfig, build_model
from lingmao.optim import OptimConfig, apply_schedule, build_optimizer, group_schedule

log = logging.getLogger(__name__)


class LingmaoLM(L.LightningModule):
    """Causal LM training: cross-entropy over the vocabulary (padding ignored), AdamW or Muon + AdamW,
    warm-up + cosine per parameter group.

    `model` and `optim` are the configs as plain dicts (so checkpoints hold plain data only).
    """

    def __init__(self, model: dict[str, Any], optim: dict[str, Any], vocab_size: int, pad_id: int = 0,
                 schedule: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = ModelConfig(**model)
        self.optim_config = OptimConfig(**optim)
        self.model = build_model(self.model_config, vocab_size)
        self.pad_id = pad_id
        self.val_ppl = Perplexity(ignore_index=pad_id)
        self.lr_scale = 1.0  # night mode's factor
        self.warmup_cap: int | None = None  # a short run's shorter warm-up (see fit_warmup)
        self.warmup_limit: int | None = None  # the warm-up of the run's first session, from its checkpoint
        self.training_config: dict[str, Any] | None = None  # recorded in every checkpoint (lingmao.runs)
        self.batches_trained = 0  # by this process
        self.val_tokens_per_char: float | None = None  # of the validation set, for val/bpc
        self.last_val_step = -1  # the optimizer step of the latest validation in this process
        # Compiled *functions*, not a wrapped module: state_dict keys stay the same with compile on or off. A
        # training step compiles whole: the forward pass and the loss in one graph (so the float32 logits of the
        # loss need not be written out, and the backward pass is compiled with them), and the optimizer's update
        # (`build_optimizer(..., compile=True)`).
        compiled = self.model_config.compile
        self._compiled_forward = torch.compile(self._model_forward) if compiled else None
        self._compiled_loss = torch.compile(self._forward_loss) if compiled else None
        self._schedules: list[tuple[float, int, float]] = []  # per parameter group: peak lr, warm-up, floor

    def configure_model(self) -> None:
        """Under hardware=fsdp, shard the model (lingmao/fsdp.py); other strategies take it as it is."""
        shard = getattr(self.trainer.strategy, "shard", None)
        if callable(shard):
            shard(self.model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self._compiled_forward is not None:
            return self._compiled_forward(idx)
        return self.model(idx)

    def _model_forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)  # through the module's call, so that FSDP's hooks run

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model(x), y)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=self.pad_id
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self._compiled_loss(x, y) if self._compiled_loss is not None else self._forward_loss(x, y)
        if logs_this_step(self.trainer):
            self.log("train/loss", loss)  # not prog_bar: that would copy it to the host every step
            self.log_position(self.trainer.global_step + 1)
        return loss

    def log_position(self, step: int) -> None:
        """Label this row of metrics with the optimizer steps done when it was measured (and the epoch), the
        same number the progress lines and the plot show. (Lightning's own label counts from 0.)"""
        self.log_dict({"step": float(step), "epoch": float(self.trainer.current_epoch)}, on_step=True,
                      on_epoch=False)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        if self.val_tokens_per_char:  # bits per character: comparable across tokenizers
            self.log("val/bpc", loss / math.log(2) * self.val_tokens_per_char, sync_dist=True)
        self.val_ppl(logits.float(), y)
        self.log("val/ppl", self.val_ppl, prog_bar=True)
        self.log_dict({"step": float(self.trainer.global_step), "epoch": float(self.trainer.current_epoch)})

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.last_val_step = self.trainer.global_step

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/loss", self.loss(self(x), y), sync_dist=True)
        self.log("step", float(self.trainer.global_step))

    # -- optimizer and schedule ----------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = self._build_optimizer()
        self._schedules = [group_schedule(self.optim_config, group) for group in optimizer.param_groups]
        return optimizer

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """The run's optimizer; a resume takes its group settings (fused, foreach, ...) from the same call."""
        return build_optimizer(self.model, self.optim_config, compile=self.model_config.compile)

    def total_steps(self) -> float:
        """The optimizer steps this run will take, as its limits and the current batches per epoch say."""
        t = self.trainer
        totals = []
        if t.max_steps is not None and t.max_steps > 0:
            totals.append(float(t.max_steps))
        if t.max_epochs is not None and t.max_epochs > 0 and self._steps_per_epoch():
            totals.append(t.max_epochs * self._steps_per_epoch())
        return min(totals) if totals else math.inf

    def _steps_per_epoch(self) -> float:
        batches = self.trainer.num_training_batches
        if not isinstance(batches, int | float) or not math.isfinite(batches) or batches <= 0:
            return 0.0
        return batches / max(1, self.trainer.accumulate_grad_batches)

    def progress(self, batch_idx: int = 0) -> float:
        """How far the run is, 0..1: by steps of `max_steps` or epochs of `max_epochs`, whichever is further."""
        t = self.trainer
        done = []
        if t.max_steps is not None and t.max_steps > 0:
            done.append(t.global_step / t.max_steps)
        batches = t.num_training_batches
        if t.max_epochs is not None and t.max_epochs > 0 and isinstance(batches, int) and batches > 0:
            done.append((t.current_epoch + batch_idx / batches) / t.max_epochs)
        return max(done) if done else 0.0

    def warmup_bound(self) -> int | None:
        """The longest warm-up any group may have: a short run's cap, or the run's first warm-up (None: none)."""
        bounds = [x for x in (self.warmup_cap, self.warmup_limit) if x is not None]
        return min(bounds) if bounds else None

    def warmup_steps(self, configured: int) -> int:
        """A group's warm-up: as configured, but never longer than `warmup_bound`."""
        bound = self.warmup_bound()
        return configured if bound is None else min(configured, bound)

    def run_warmup(self) -> int:
        """The longest warm-up any parameter group of this run uses."""
        cfg = self.optim_config
        configured = [cfg.warmup_steps]
        if cfg.name == "muon" and cfg.muon.warmup_steps is not None:
            configured.append(cfg.muon.warmup_steps)
        return max(self.warmup_steps(w) for w in configured)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches_trained += 1

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.setdefault(META_KEY, {})
        meta["warmup_steps"] = self.run_warmup()
        if self.training_config is not None:
            meta["config"] = self.training_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        warmup = (checkpoint.get(META_KEY) or {}).get("warmup_steps")
        if isinstance(warmup, int):
            self.warmup_limit = warmup
        self._fit_optimizer_state(checkpoint)

    def _fit_optimizer_state(self, checkpoint: dict[str, Any]) -> None:
        """Make the checkpoint's optimizer state fit this run's optimizer: another optimizer (an accepted
        `optim.name` change) starts afresh; otherwise the groups take this run's settings (weight decay, betas,
        momentum ...), since loading a state would put the checkpoint's back."""
        states = checkpoint.get("optimizer_states") or []
        before = ((checkpoint.get("hyper_parameters") or {}).get("optim") or {}).get("name")
        if not states:
            return
        if before is not None and before != self.optim_config.name:
            log.warning("optim.name %s -> %s: the optimizer state of the checkpoint does not carry over; the new "
                        "optimizer starts afresh", before, self.optim_config.name)
            checkpoint["optimizer_states"] = []  # Lightning loads one state per optimizer: none
            return
        saved, fresh = states[0], self._build_optimizer().state_dict()
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if not groups or [len(g["params"]) for g in groups] != [len(g["params"]) for g in fresh["param_groups"]]:
            return  # another layout (e.g. sharded): left to Lightning
        for old, new in zip(groups, fresh["param_groups"], strict=True):
            old.update({k: v for k, v in new.items() if k != "params"})

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step, progress, total = self.trainer.global_step, self.progress(batch_idx), self.total_steps()
        for optimizer in self.trainer.optimizers:
            apply_schedule(optimizer, self._schedules, step, total, progress, self.warmup_bound(), self.lr_scale)

    def on_train_start(self) -> None:
        # The loaders exist and night mode has chosen its batch: the steps counted are those the run will take.
        self.fit_warmup(self.total_steps())

    def fit_warmup(self, planned_steps: float) -> None:
        """A warm-up longer than half the run would leave the run no time to learn at full rate: use a tenth of
        the run instead, and say so once."""
        cfg = self.optim_config
        warmup = max(cfg.warmup_steps, cfg.muon.warmup_steps or 0) if cfg.name == "muon" else cfg.warmup_steps
        if planned_steps and math.isfinite(planned_steps) and warmup > planned_steps / 2:
            self.warmup_cap = max(1, int(planned_steps // 10))
            log.warning("optim.warmup_steps=%d is more than half of this run's %d steps: warming up over %d steps "
                        "(a tenth of the run) instead", warmup, planned_steps, self.warmup_cap)

    def set_lr_scale(self, scale: float) -> None:
        """Multiply the learning-rate curve by `scale` from the next step on (used by night mode)."""
        self.lr_scale = scale
