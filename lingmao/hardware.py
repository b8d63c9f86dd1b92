"""Which device to train on, and with which precision."""

from __future__ import annotations

import logging

import torch

from lingmao.errors import LingmaoError

log = logging.getLogger(__name__)

ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


def available_accelerators() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found.insert(0, "cuda")
    if torch.backends.mps.is_available():
        found.insert(0, "mps")
    return found


def best_accelerator() -> str:
    """cuda if present, else mps, else cpu: what 'auto' means everywhere."""
    have = available_accelerators()
    return "cuda" if "cuda" in have else "mps" if "mps" in have else "cpu"


def resolve_accelerator(requested: str) -> str:
    """'auto' -> cuda, else mps, else cpu; an explicit choice must exist on this machine."""
    requested = {"gpu": "cuda"}.get(requested, requested)
    if requested not in ACCELERATORS:
        raise LingmaoError(f"hardware.accelerator: '{requested}' is not one of {', '.join(ACCELERATORS)}")
    have = available_accelerators()
    if requested == "auto":
        return best_accelerator()
    if requested not in have:
        name = {"cuda": "CUDA", "mps": "MPS"}[requested]
        raise LingmaoError(
            f"hardware={requested}: {name} is not available on this machine (available: {', '.join(have)}); "
            f"use hardware={have[0]} or hardware=auto"
        )
    return requested


def resolve_precision(precision: str | None, accelerator: str) -> str:
    """'auto' -> bf16-mixed on GPUs that support it, 16-mixed (with a grad scaler) on older CUDA GPUs,
    32-true on CPU and MPS (their mixed-precision paths are slower or incomplete for training)."""
    if precision not in (None, "auto"):
        return str(precision)
    if accelerator == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"
