"""Every private or version-bound API of torch, Lightning and Hydra that lingmao relies on, in one place.

Each use says why no public API serves and names the upstream symbol and the version it was written against
(`UPSTREAM`); `tests/test_compat.py` checks every entry against the installed packages and, when an upgrade
removes or changes one, fails with a message naming the symbol, the versions and the part of lingmao to fix.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Upstream:
    """A private or version-bound symbol: `module:attribute.path`, its distribution, the version this module
    was written against (and checked with, down to the floor in pyproject.toml), and who needs it."""

    symbol: str
    package: str
    written_against: str
    used_by: str


UPSTREAM = (
    Upstream("hydra._internal.utils:run_and_report", "hydra-core", "1.3.8", "lingmao.cli's one-line config errors"),
    Upstream("lightning.pytorch.loggers.csv_logs:ExperimentWriter._check_log_dir_exists", "lightning", "2.6.6",
             "lingmao.loggers: metrics.csv appended across resumes"),
    Upstream("lightning.fabric.strategies.launchers.subprocess_script:_hydra_subprocess_cmd", "lightning", "2.6.6",
             "lingmao.distributed: DDP ranks of one job of a Hydra multirun"),
    Upstream("lightning.fabric.utilities.types:_Stateful", "lightning", "2.6.6",
             "lingmao.data.windows: the train loader's place saved in checkpoints"),
    Upstream("torch.optim._muon:_zeropower_via_newtonschulz", "torch", "2.13.0",
             "lingmao.optim.Muon: the Newton-Schulz iteration in float32 on CPUs"),
    Upstream("torch.optim._muon:_adjust_lr", "torch", "2.13.0", "lingmao.optim.Muon: the per-matrix learning rate"),
    Upstream("torch:Tensor._version", "torch", "2.13.0",
             "lingmao.model.GPT.decode_step: kept while no weight has changed"),
)


def resolve(symbol: str) -> Any:
    """The object `module:attribute.path` names; ImportError or AttributeError when it is gone."""
    module, _, path = symbol.partition(":")
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------------------------
# Hydra: a composition error as one line
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def hydra_error_reporter(describe: Callable[[BaseException], str | None], exit_code: int) -> Iterator[None]:
    """While inside, a composition error that `describe` turns into a line is printed as `error: <line>` and
    exits with `exit_code`; any other error goes to Hydra's own reporting, unchanged.

    Hydra reports these through `hydra._internal.utils.run_and_report` (exit 1, several lines) and offers no
    hook to format them (hydra-ecosystem/hydra#3454 is about their presentation), so that module function is
    swapped for a wrapper for the duration of the call. Without it (another Hydra layout), Hydra's reporting
    stays as it is.
    """
    try:
        from hydra._internal import utils as hydra_utils
    except ImportError:  # pragma: no cover - checked by tests/test_compat.py
        yield
        return
    original = getattr(hydra_utils, "run_and_report", None)
    if original is None:  # pragma: no cover - checked by tests/test_compat.py
        yield
        return

    def run_and_report(func: Callable[[], Any]) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except Exception as exc:
                message = describe(exc)
                if message is None:
                    raise
                print(f"error: {message}", file=sys.stderr)
                sys.exit(exit_code)

        return original(guarded)

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


# ----------------------------------------------------------------------------------------------
# Lightning's CSV logger, appending
# ----------------------------------------------------------------------------------------------
def appending_csv_logger(save_dir: str) -> Any:
    """Lightning's `CSVLogger` writing `<save_dir>/metrics.csv`, appending when the file exists (a resumed run)
    under the file's own header (new columns rewrite the file with a wider header, as Lightning does).

    CSVLogger has no option to append: since Lightning-AI/pytorch-lightning#19446 (Lightning 2.2) its
    `ExperimentWriter` deletes an existing metrics.csv in the private `_check_log_dir_exists`, which is
    overridden here; the writer is made in `experiment`, which reads the private `_experiment` and `_fs`.
    """
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class AppendingWriter(ExperimentWriter):
        def __init__(self, log_dir: str) -> None:
            super().__init__(log_dir)
            if os.path.isfile(self.metrics_file_path):
                with open(self.metrics_file_path, newline="") as f:
                    self.metrics_keys = list(next(csv.reader(f), []))

        def _check_log_dir_exists(self) -> None:
            pass

    class AppendingCSVLogger(CSVLogger):
        @property
        def experiment(self) -> ExperimentWriter:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return AppendingCSVLogger(save_dir=save_dir, name="", version="")


# ----------------------------------------------------------------------------------------------
# Lightning's DDP launcher under Hydra
# ----------------------------------------------------------------------------------------------
# Lightning's script launcher (`_hydra_subprocess_cmd`, no public equivalent) starts ranks > 0 by re-running
# `sys.argv` with `hydra.run.dir=<HydraConfig run.dir>` appended, so `lingmao.distributed.single_job_command`
# rewrites both for one job of a multirun; the launcher leaves these variables in the environment of rank 0.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


# ----------------------------------------------------------------------------------------------
# Lightning's checkpoints and stateful loaders
# ----------------------------------------------------------------------------------------------
def batches_completed(checkpoint: dict[str, Any]) -> int:
    """Training batches done, from a Lightning checkpoint's fit-loop state (its layout is Lightning's own;
    KeyError or TypeError when it has none)."""
    return int(checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"])


def saves_loader_state(loader: Any) -> bool:
    """Whether Lightning keeps `loader.state_dict()` in checkpoints and gives it back by `load_state_dict()`:
    it does for a train loader that is `lightning.fabric.utilities.types._Stateful` (Lightning 2.2 and later)."""
    from lightning.fabric.utilities.types import _Stateful

    return isinstance(loader, _Stateful)


# ----------------------------------------------------------------------------------------------
# torch.optim.Muon's internals
# ----------------------------------------------------------------------------------------------
def orthogonalize(g: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """torch's Newton-Schulz iteration (`torch.optim._muon._zeropower_via_newtonschulz`, which works in bfloat16
    only): about U V^T of g = U S V^T, computed in `dtype`."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch's learning-rate adjustment for a matrix of `shape` (`torch.optim._muon._adjust_lr`)."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols))


# ----------------------------------------------------------------------------------------------
# torch's version counters
# ----------------------------------------------------------------------------------------------
def parameters_state(module: torch.nn.Module) -> tuple[tuple[int, int], ...] | None:
    """What changes when any parameter of `module` is replaced or written in place (by an optimizer, by
    `load_state_dict`, ...): each one's storage and the version counter torch keeps for autograd
    (`Tensor._version`, which every in-place operation increments; torch has no public way to ask whether a
    tensor changed). None where that cannot be told: tensor subclasses (FSDP's DTensors) and tensors made in
    inference mode, which keep no counter."""
    state = []
    for p in module.parameters():
        if type(p.data) is not torch.Tensor or p.is_inference():
            return None
        state.append((p.data_ptr(), p._version))
    return tuple(state)
