"""A run is its config: the settings that decide what a run trains, recorded in its folder and checkpoints and
compared when it resumes; and a run that fails before its first step leaves no folder behind.

- `training_config(cfg)`: the composed config as `{dotted key: value}`, without the keys that never change what
  is trained (`lingmao.names.NOT_IN_RUN_NAME`: the machine, night mode, logging, paths, checkpoint cadence, ...)
  and without `CHANGE_ON_RESUME`, the keys a resume is meant to change (the schedule's length and its learning
  rates). `config_hash` is a digest of it. The run folder keeps both in `training_config.json`; every
  checkpoint keeps the config (`checkpoint["lingmao"]["config"]`), which is what a resume is compared with.
- `check_same_settings`: a resume whose training config differs is refused in one line listing each difference
  and the two ways on: a run of its own (`run_name=...`), or `resume_changed=accept`.
- `RunFolder`: what a run made in its folder, removed again when it fails before its first training step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lingmao import names
from lingmao.errors import LingmaoError
from lingmao.io import atomic_write_json

log = logging.getLogger(__name__)

RECORD = "training_config.json"
# Keys that change what is trained but that a resume is meant to change: how long the schedule runs and its
# learning rates (peak, warm-up, floor; see docs/training.md for the warm-up of a resumed run). The keys that
# never change what is trained (the machine and the rest) are `names.NOT_IN_RUN_NAME`.
CHANGE_ON_RESUME = (
    "trainer.max_steps", "trainer.max_epochs", "optim.lr", "optim.warmup_steps", "optim.min_lr_ratio",
    "optim.muon.lr", "optim.muon.warmup_steps", "optim.muon.min_lr_ratio",
)
MAX_SHOWN = 8


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 1e-3}}` -> `{"optim.lr": 1e-3}` (lists stay values)."""
    if not isinstance(values, dict):
        return {prefix.rstrip("."): values}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changes_training(key: str) -> bool:
    """Whether a config key is part of the run's identity: it changes what is trained and a resume may not
    change it (without `resume_changed=accept`)."""
    return names.trains_differently(key) and key not in CHANGE_ON_RESUME


def training_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The settings that decide what this run trains, as `{dotted key: plain value}` (see the module docstring)."""
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return {k: v for k, v in sorted(flatten(values).items()) if changes_training(k)}


def config_hash(config: dict[str, Any]) -> str:
    """A short digest of a training config (the same settings give the same hash in any process)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_record(run_dir: Path, config: dict[str, Any]) -> Path:
    """`<run dir>/training_config.json`: the training config and its hash."""
    path = Path(run_dir) / RECORD
    atomic_write_json(path, {"hash": config_hash(config), "config": config})
    return path


def config_of_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The training config a checkpoint records; for checkpoints written before it was recorded, the model and
    optimizer settings its hyperparameters hold (so an optimizer switch is still noticed)."""
    recorded = (checkpoint.get("lingmao") or {}).get("config")
    if isinstance(recorded, dict):
        return recorded
    hp = checkpoint.get("hyper_parameters") or {}
    partial = flatten({group: hp[group] for group in ("model", "optim") if isinstance(hp.get(group), dict)})
    return {k: v for k, v in partial.items() if changes_training(k)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: checkpoint X, now Y` for each key both configs hold with other values (a key only one of them
    holds comes from another lingmao version, with the behaviour of its default: not a difference)."""
    return [
        f"{key}: checkpoint {old[key]!r}, now {new[key]!r}"
        for key in sorted(set(old) & set(new)) if _plain(old[key]) != _plain(new[key])
    ]


def check_same_settings(path: Path | str, old: dict[str, Any], new: dict[str, Any], accept: bool) -> list[str]:
    """Refuse (one-line LingmaoError) to resume checkpoint `path`, trained with `old`, under other settings
    `new`, unless `accept`; returns the differences (logged when accepted)."""
    diffs = differences(old, new)
    if diffs and not accept:
        shown = "; ".join(diffs[:MAX_SHOWN]) + (f"; ... ({len(diffs) - MAX_SHOWN} more)" if len(diffs) > MAX_SHOWN
                                                else "")
        raise LingmaoError(
            f"{path} was trained with other settings: {shown}. To train with these settings, give them a run of "
            "their own (run_name=NAME); to continue this run with them, add resume_changed=accept"
        )
    if diffs:
        log.warning("resume_changed=accept: continuing %s with other settings: %s", path, "; ".join(diffs))
    return diffs


# ----------------------------------------------------------------------------------------------
# A run that fails before its first step
# ----------------------------------------------------------------------------------------------
def _entries(directory: Path) -> dict[Path, int]:
    """Every path under `directory` -> its inode (a renamed file keeps its inode)."""
    out = {}
    for path in directory.rglob("*"):
        try:
            out[path] = path.lstat().st_ino
        except OSError:
            pass
    return out


class RunFolder:
    """The run folder as this process found it, so that a run failing before its first training step can remove
    what it made there: the whole folder when the run created it, else only the files and folders that are new
    (a file that was there before and was only renamed, e.g. `last.ckpt.damaged`, is kept).

    `open(run_dir)` before anything is written there, `watch(module)` once the LightningModule exists (its
    `batches_trained` says whether a step was trained)."""

    def __init__(self) -> None:
        self.run_dir: Path | None = None
        self.existed = True
        self.before: dict[Path, int] = {}
        self.module: Any = None

    def open(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.existed = self.run_dir.exists()
        self.before = _entries(self.run_dir) if self.existed else {}

    def watch(self, module: Any) -> None:
        self.module = module

    @property
    def trained(self) -> bool:
        return self.module is not None and getattr(self.module, "batches_trained", 0) > 0

    def remove_what_this_run_made(self) -> None:
        """Nothing once a step was trained (its checkpoints and metrics are work to keep); global rank 0 only."""
        from lightning.pytorch.utilities import rank_zero_only

        if self.run_dir is None or self.trained or rank_zero_only.rank != 0 or not self.run_dir.exists():
            return
        if not self.existed:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            log.info("removed %s: the run stopped before its first step", self.run_dir)
            return
        inodes = set(self.before.values())
        new = [p for p, inode in _entries(self.run_dir).items() if p not in self.before and inode not in inodes]
        for path in sorted(new, key=lambda p: len(p.parts), reverse=True):  # files before their folders
            try:
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()  # only when empty: anything else in it was there before
                else:
                    os.unlink(path)
            except OSError:
                pass


def record(cfg: DictConfig, run_dir: Path, config: dict[str, Any]) -> None:
    """Save the composed config (`config.yaml`) and the training config with its hash (`training_config.json`)
    in the run folder: called once the run is sure to train (after the resume checks), on global rank 0."""
    from lightning.pytorch.utilities import rank_zero_only

    from lingmao.report import announce_config

    if rank_zero_only.rank == 0:
        announce_config(cfg, run_dir, print_tree=False)
        write_record(run_dir, config)
