"""Sweeps: finished-run markers and the summary CSV of a Hydra multirun.

- `train()` returns a run's lowest `val/loss` (tracked by `monitoring.TrainingMonitor`, kept in
  checkpoints), which is what Hydra's sweepers (Optuna) minimise.
- A run that ends normally writes `finished.json` in its run directory. Re-launching the same command or
  sweep then returns the recorded result at once instead of loading data and evaluating again, unless
  `trainer.max_steps` / `trainer.max_epochs` changed (training longer resumes from last.ckpt).
- `SweepSummary`, a Hydra callback, writes `<sweep dir>/summary.csv` at the end of a multirun: one row
  per job with its overrides and best validation loss, best first.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from lingmao.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

FINISHED_FILE = "finished.json"
RESULT_FILE = "result.json"
SUMMARY_FILE = "summary.csv"
@dataclass
class RunResult:
    """What a finished run leaves in `finished.json`."""

    best_val_loss: float | None
    last_val_loss: float | None
    global_step: int
    max_steps: int
    max_epochs: int | None
    fingerprint: str


def training_fingerprint(cfg: DictConfig) -> str:
    """A digest of what decides the trained weights: model, optimizer, data, seed and the step limits."""
    keys = ("model", "optim", "data", "seed")
    what = {k: OmegaConf.to_container(cfg[k], resolve=True) if k != "seed" else cfg[k] for k in keys if k in cfg}
    what["limits"] = [cfg.trainer.max_steps, cfg.trainer.max_epochs]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def mark_finished(
    run_dir: Path, cfg: DictConfig, best_val_loss: float | None, last_val_loss: float | None, global_step: int
) -> None:
    """Record that the run in `run_dir` ended normally (call on global rank 0 only)."""
    result = RunResult(best_val_loss, last_val_loss, int(global_step), int(cfg.trainer.max_steps),
                       cfg.trainer.max_epochs, training_fingerprint(cfg))
    atomic_write(Path(run_dir) / FINISHED_FILE, lambda f: f.write(json.dumps(asdict(result)).encode()))


def finished_result(run_dir: Path, cfg: DictConfig) -> RunResult | None:
    """The recorded result when this run already finished with the same settings and limits, else None.

    Only with `auto_resume` (and no `resume_from`): re-launching a sweep then skips its finished jobs.
    """
    path = Path(run_dir) / FINISHED_FILE
    if not cfg.auto_resume or cfg.resume_from or not path.is_file():
        return None
    try:
        result = RunResult(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        log.warning("%s is unreadable; running again", path)
        return None
    if result.fingerprint != training_fingerprint(cfg):
        return None  # trained longer or otherwise changed: the usual resume path decides
    log.info(
        "%s: this run already finished (step %d, best val/loss %s); skipping it. Delete the file or set "
        "auto_resume=false to run it again.", path, result.global_step, result.best_val_loss,
    )
    return result


# ----------------------------------------------------------------------------------------------
# The summary of a multirun
# ----------------------------------------------------------------------------------------------
def _is_multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


class SweepSummary(HydraCallback):
    """Hydra callback: each job of a multirun leaves `result.json` in its directory; at the end of the
    multirun they are gathered into `<sweep dir>/summary.csv`, best validation loss first.

    Reading the files back (rather than keeping results in memory) works with launchers that run jobs
    in other processes or on other machines, and keeps the rows of jobs that failed.
    """

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        from hydra.core.utils import JobStatus

        value = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        row = {
            "overrides": list(job_return.overrides or []),
            "best_val_loss": float(value) if isinstance(value, int | float) else None,
            "status": job_return.status.name.lower(),
            "job_dir": str(config.hydra.runtime.output_dir),
        }
        atomic_write(Path(row["job_dir"]) / RESULT_FILE, lambda f: f.write(json.dumps(row).encode()))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        path = write_summary(sweep_dir)
        if path is not None:
            log.info("sweep summary: %s", path)


def write_summary(sweep_dir: Path) -> Path | None:
    """Gather the `result.json` files under `sweep_dir` into `summary.csv`; return its path."""
    rows = []
    for path in sorted(Path(sweep_dir).rglob(RESULT_FILE)):
        try:
            rows.append(json.loads(path.read_text()))
        except ValueError:
            log.warning("%s is unreadable; left out of the sweep summary", path)
    if not rows:
        return None
    values = [dict(map(_split, row["overrides"])) for row in rows]
    keys = list(dict.fromkeys(k for v in values for k in v))
    # A column for each key that differs between jobs (all keys when nothing differs); `overrides` has the rest.
    varying = [k for k in keys if len({v.get(k, "") for v in values}) > 1] or keys
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["best_val_loss"] is None, rows[i]["best_val_loss"] or 0.0))
    out = Path(sweep_dir) / SUMMARY_FILE
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["rank", "best_val_loss", "status", *varying, "overrides", "job_dir"])
    for rank, i in enumerate(order, start=1):
        loss = rows[i]["best_val_loss"]
        shown = [values[i].get(k, "") for k in varying]
        loss_text = "" if loss is None else f"{loss:.6g}"
        overrides = " ".join(rows[i]["overrides"])
        writer.writerow([rank, loss_text, rows[i]["status"], *shown, overrides, rows[i]["job_dir"]])
    atomic_write_text(out, text.getvalue())
    rows = [rows[i] for i in order]
    best = rows[0]
    if best["best_val_loss"] is not None:
        log.info("best job: val/loss %.4f with %s", best["best_val_loss"], " ".join(best["overrides"]))
    return out
