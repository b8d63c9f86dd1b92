"""`LingmaoLM`: the LightningModule around `SimpleTransformer`: loss, metrics, optimizer, schedule."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from lingmao.model import SimpleTransformer

MODEL_KEYS = (
    "d_model", "nhead", "num_layers", "dim_feedforward", "dropout", "max_len", "tie_weights", "norm_first",
    "activation",
)


class WarmupCosine:
    """Learning-rate multiplier per optimizer step: linear warm-up, then cosine decay to a floor.

    `scale` multiplies the whole curve (night mode lowers it); it is part of the scheduler state.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> None:
        self.warmup_steps = max(0, int(warmup_steps))
        self.total_steps = max(1, int(total_steps))
        self.min_lr_ratio = min_lr_ratio
        self.scale = 1.0

    def base(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.base(step) * self.scale


def logs_this_step(trainer: L.Trainer | None) -> bool:
    """Whether the loggers write this training step. `LightningModule.log` costs about a millisecond of Python
    on every call (Lightning moves its result store to the device each time), and only these steps' values
    are written, so per-step metrics are logged on these steps alone."""
    if trainer is None:
        return True
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)


def build_model(vocab_size: int, model_cfg: dict[str, Any]) -> SimpleTransformer:
    return SimpleTransformer(vocab_size, **{k: model_cfg[k] for k in MODEL_KEYS if k in model_cfg})


class LingmaoLM(L.LightningModule):
    """Causal LM training: cross-entropy over the vocabulary (padding ignored), AdamW, warm-up + cosine."""

    def __init__(self, model: dict[str, Any], optim: dict[str, Any], vocab_size: int, pad_id: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(vocab_size, model)
        self.optim_cfg = optim
        self.pad_id = pad_id
        self.val_ppl = Perplexity(ignore_index=pad_id)
        self.tokens_per_char: float | None = None  # of the validation file, set by train.py for val/bpc
        # A compiled *function*, not a wrapped module: state_dict keys stay the same with compile on or off.
        self._compiled_forward = torch.compile(self.model.forward) if model.get("compile") else None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self._compiled_forward is not None:
            return self._compiled_forward(idx)
        return self.model(idx)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=self.pad_id
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        if logs_this_step(self._trainer):
            self.log("train/loss", loss)  # not prog_bar: that would copy it to the host every step
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        if self.tokens_per_char:  # bits per character: comparable across tokenizers
            self.log("val/bpc", loss / math.log(2) * self.tokens_per_char, sync_dist=True)
        self.val_ppl(logits.float(), y)
        self.log("val/ppl", self.val_ppl, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/loss", self.loss(self(x), y), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():  # shared (tied) tensors are listed once
            if p.requires_grad:
                # Matrices (attention, feed-forward, embedding/head) decay; biases and norm gains do not. Decided
                # by name, not p.dim(): under FSDP the parameters seen here are flat 1-D shards.
                (no_decay if name.endswith("bias") or "norm" in name else decay).append(p)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg["lr"],
            betas=tuple(cfg.get("betas", (0.9, 0.95))),
            eps=cfg.get("eps", 1e-8),
            fused=cfg.get("fused") if torch.cuda.is_available() else None,
        )
        schedule = WarmupCosine(cfg["warmup_steps"], self.trainer.estimated_stepping_batches, cfg["min_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def set_lr_scale(self, scale: float) -> None:
        """Multiply the learning-rate curve by `scale` from now on (used by night mode)."""
        for sched_cfg in self.trainer.lr_scheduler_configs:
            sched = sched_cfg.scheduler
            for fn, group, base_lr in zip(sched.lr_lambdas, sched.optimizer.param_groups, sched.base_lrs, strict=True):
                fn.scale = scale
                group["lr"] = base_lr * fn(sched.last_epoch)
