"""Optimizer settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from lingmao.checks import check_fields, number
from lingmao.errors import LingmaoError


@dataclass
class OptimConfig:
    """AdamW with weight decay on matrices only; per-step linear warm-up then cosine decay to min_lr_ratio * lr."""

    KEY: ClassVar[str] = "optim"
    name: str = "adamw"
    lr: float = number(1.0e-3, gt=0)  # the design's learning_rate
    weight_decay: float = number(0.1, ge=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = number(1.0e-8, gt=0)
    warmup_steps: int = number(100, ge=0)  # optimizer steps
    min_lr_ratio: float = number(0.1, ge=0, le=1)  # the cosine floor, as a fraction of lr
    max_grad_norm: float | None = number(1.0, gt=0)  # gradient clipping (null = off)
    accumulation_steps: int = number(1, ge=1)  # batches per optimizer step
    fused: bool | None = None  # fused AdamW kernel on CUDA (null = torch's choice)

    def __post_init__(self) -> None:
        check_fields(self)
        if len(self.betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in self.betas):
            raise LingmaoError(
                f"optim.betas={list(self.betas)}: allowed: a list of two numbers in [0, 1), e.g. [0.9, 0.95]"
            )
