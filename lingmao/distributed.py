"""More than one process: Lightning strategies from `cfg.hardware`, and DDP launched from the Hydra app.

Lightning's DDP launcher starts ranks > 0 by re-running this process's command line. Under `-m` that
command line is the whole sweep, so each extra rank would run every job of it. `single_job_command`
rewrites the command line, for the duration of one sweep job, into a single run of that job: the same
config flags, the job's own overrides (the sweeper's choices included) and its output directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import read_write

from lingmao.compat import LAUNCHER_ENV
from lingmao.hardware import FSDPConfig, HardwareConfig

log = logging.getLogger(__name__)

# Hydra overrides that make sense in a single run of one job (the rest belong to the sweep).
_KEPT_HYDRA_OVERRIDES = ("hydra.job.chdir", "hydra.job.env_set", "hydra.job.config", "hydra.verbose",
                         "hydra/job_logging", "hydra/hydra_logging", "hydra.job_logging", "hydra.hydra_logging")


def build_strategy(hw: HardwareConfig, block_types: set[type] | None = None) -> Any:
    """`hardware.strategy` as Lightning takes it: a name, or a configured DDP / FSDP strategy object.

    `block_types`: the model's Transformer block classes; FSDP shards one unit per block (lingmao/fsdp.py)."""
    if hw.strategy == "fsdp":
        from lingmao.fsdp import FSDP, processes_per_node
        from lingmao.hardware import resolve_accelerator

        backend = hw.ddp.process_group_backend if hw.ddp is not None else None
        return FSDP(hw.fsdp or FSDPConfig(), block_types or set(),
                    processes_per_node(hw.devices, resolve_accelerator(hw.accelerator)), hw.num_nodes, backend)
    if hw.strategy == "ddp" and hw.ddp is not None:
        from lightning.pytorch.strategies import DDPStrategy

        opts = {k: v for k, v in dataclasses.asdict(hw.ddp).items() if v is not None}
        return DDPStrategy(**opts)
    return hw.strategy


def _config_flags(argv: list[str]) -> list[str]:
    """The config-selection flags of a Hydra command line (-cp, -cn, -cd), without overrides or -m."""
    parser = argparse.ArgumentParser(add_help=False)
    for short, long in (("-cp", "--config-path"), ("-cn", "--config-name"), ("-cd", "--config-dir")):
        parser.add_argument(short, long, dest=long[2:].replace("-", "_"))
    known, _ = parser.parse_known_args(argv)
    flags: list[str] = []
    for long in ("--config-path", "--config-name", "--config-dir"):
        value = getattr(known, long[2:].replace("-", "_"))
        if value is not None:
            flags += [long, value]
    return flags


def _kept_hydra_overrides(overrides: list[str]) -> list[str]:
    return [o for o in overrides if o.lstrip("+~").startswith(_KEPT_HYDRA_OVERRIDES)]


@contextmanager
def single_job_command() -> Iterator[None]:
    """Inside one job of a Hydra multirun, make `sys.argv` the command line of that job alone.

    Lightning's launcher (`_hydra_subprocess_cmd`, a private function: `lingmao.compat`) appends
    `hydra.run.dir=<HydraConfig run.dir>`, so the run dir is pointed at the job's output directory too: the
    extra ranks log next to rank 0's job.
    At the end of the job, the process group and the launcher's environment variables are cleared, so the
    next job starts its own ranks. Outside a multirun this does nothing.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get() if HydraConfig.initialized() else None
    except ImportError:  # pragma: no cover - hydra is a dependency
        hc = None
    if hc is None or hc.mode != RunMode.MULTIRUN:
        yield
        return
    saved_argv, saved_dir = list(sys.argv), hc.run.dir
    # With LOCAL_RANK still set, the next job would believe its ranks were started by someone else and wait for them.
    saved_env = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    sys.argv = [
        sys.argv[0], *_config_flags(sys.argv[1:]), *_kept_hydra_overrides(list(hc.overrides.hydra)),
        *hc.overrides.task,
    ]
    with read_write(hc.run):
        hc.run.dir = hc.runtime.output_dir
    log.debug("command line of this job's other ranks: %s", sys.argv)
    try:
        yield
    finally:
        sys.argv = saved_argv
        with read_write(hc.run):
            hc.run.dir = saved_dir
        _end_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def outlive(pid: int | None, seconds: float = 60.0) -> None:
    """Wait (at most `seconds`) until process `pid`, this process's parent, has exited (see
    `lingmao.callbacks.fault_tolerance.interrupted`)."""
    if not pid:
        return
    deadline = time.monotonic() + seconds
    while os.getppid() == pid and time.monotonic() < deadline:
        time.sleep(0.05)
