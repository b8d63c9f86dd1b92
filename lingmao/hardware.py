"""Which device to train on, with which precision, in how many processes; and what this process may take of
the machine (threads, CPU cores, GPU memory)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lingmao.checks import check_fields, choice, number
from lingmao.errors import LingmaoError

log = logging.getLogger(__name__)

ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
PRECISIONS = (
    "auto", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true", "64",
    "transformer-engine", "transformer-engine-float16", 16, 32, 64,
)
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD")


@dataclass
class DDPConfig:
    """Arguments of Lightning's DDPStrategy (null = Lightning's default)."""

    KEY: ClassVar[str] = "hardware.ddp"
    find_unused_parameters: bool = False
    gradient_as_bucket_view: bool = True
    static_graph: bool | None = None
    process_group_backend: str | None = None  # null = nccl on GPUs, gloo on CPU


@dataclass
class FSDPConfig:
    """FSDP2 (`fully_shard`) through Lightning's ModelParallelStrategy: one unit per Transformer block
    (lingmao/fsdp.py)."""

    KEY: ClassVar[str] = "hardware.fsdp"
    # FULL_SHARD | SHARD_GRAD_OP (parameters whole between forward and backward) | HYBRID_SHARD (shard within a
    # machine, replicate across machines)
    sharding_strategy: str = choice("FULL_SHARD", *FSDP_SHARDING)
    activation_checkpointing: bool = True  # recompute activations in backward: less memory, ~1/3 more compute
    cpu_offload: bool = False  # GPUs: keep parameters in CPU memory between uses (slow; the very largest models)
    # full: one file, written by rank 0; sharded: a directory of one file per rank, written in parallel.
    # Both resume on any number of processes.
    state_dict_type: str = choice("full", "full", "sharded")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class HardwareConfig:
    """Device, precision, processes, and what the run may take of the machine."""

    KEY: ClassVar[str] = "hardware"
    name: str = "auto"
    accelerator: str = choice("auto", *ACCELERATORS)  # auto = cuda if present, else mps, else cpu
    devices: Any = 1  # devices (processes) per machine: a number, "auto" or a list of device indices
    strategy: str = "auto"  # auto | ddp | ddp_spawn | fsdp | any Lightning strategy name
    num_nodes: int = number(1, ge=1)
    precision: Any = choice("auto", *PRECISIONS)  # auto: bf16-mixed / 16-mixed on CUDA, 32-true on CPU and MPS
    gpu_memory_fraction: float | None = number(None, gt=0, le=1)  # cap this process's CUDA memory (null = no cap)
    empty_cache_every_n_steps: int = number(0, ge=0)  # free the CUDA/MPS allocator cache every N steps (0 = never)
    cpu_threads: int | None = number(None, ge=1)  # torch intra-op threads (null = chosen by lingmao.hardware)
    matmul_precision: str | None = choice("high", "highest", "high", "medium")  # TF32 on Ampere+ GPUs
    ddp: DDPConfig | None = None
    fsdp: FSDPConfig | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        try:
            resolve_accelerator(self.accelerator)
        except LingmaoError as exc:
            if self.name and self.name != self.accelerator:
                raise LingmaoError(
                    f"hardware={self.name} (hardware.accelerator={self.accelerator}): {str(exc).split(': ', 1)[-1]}"
                ) from None
            raise


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


def configure_process(hw: HardwareConfig) -> None:
    """Settings of this process that the Trainer does not make: CPU threads and float32 matmul precision."""
    if hw.cpu_threads:
        torch.set_num_threads(hw.cpu_threads)
    if hw.matmul_precision:
        torch.set_float32_matmul_precision(hw.matmul_precision)


# ----------------------------------------------------------------------------------------------
# Process limits: threads / CPU affinity / GPU memory
# ----------------------------------------------------------------------------------------------
# torch's default MPS limit when PYTORCH_MPS_HIGH_WATERMARK_RATIO is not set (see torch.mps docs).
MPS_DEFAULT_HIGH_WATERMARK = 1.7


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
    """Applies and lifts a share of the machine for one device type (night mode's limits).

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
        """Remember the unlimited settings (call before applying)."""
        self.device = device
        self.day_threads = torch.get_num_threads()
        self.day_cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None

    @property
    def limits_threads(self) -> bool:
        return self.device.type in ("cpu", "mps")

    def _gpu_fraction(self, limited: bool) -> float:
        base = self.base_gpu_fraction if self.base_gpu_fraction is not None else 1.0
        return min(base, self.gpu_memory_fraction) if limited else base

    def set(self, limited: bool) -> list[str]:
        """Apply (limited=True) or lift the limits; return what changed, as short phrases for the log."""
        if limited == self.active:
            return []
        self.active = limited
        changes: list[str] = []
        if self.limits_threads:
            before = torch.get_num_threads()
            after = max(1, int(self.day_threads * self.cpu_fraction)) if limited else self.day_threads
            torch.set_num_threads(after)
            changes.append(f"threads {before}->{after}")
            if self.day_cpus is not None and hasattr(os, "sched_setaffinity") and len(self.day_cpus) > 1:
                cpus = (set(sorted(self.day_cpus)[: max(1, int(len(self.day_cpus) * self.cpu_fraction))])
                        if limited else self.day_cpus)
                before_cpus = len(os.sched_getaffinity(0))
                _set_affinity(cpus)
                changes.append(f"cpus {before_cpus}->{len(cpus)}")
        if self.device.type == "cuda":
            before_f, after_f = self._gpu_fraction(not limited), self._gpu_fraction(limited)
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(after_f, index)
            if limited:
                torch.cuda.empty_cache()
            changes.append(f"gpu memory {before_f:.0%}->{after_f:.0%}")
        elif self.device.type == "mps":
            # hardware.gpu_memory_fraction is a CUDA cap; MPS's unlimited setting is torch's own.
            day = float(os.environ.get("PYTORCH_MPS_HIGH_WATERMARK_RATIO", MPS_DEFAULT_HIGH_WATERMARK))
            after_f = min(day, self.gpu_memory_fraction) if limited else day
            torch.mps.set_per_process_memory_fraction(after_f)
            if limited:
                torch.mps.empty_cache()
            changes.append(f"mps memory limit x{after_f:g}")
        return changes
