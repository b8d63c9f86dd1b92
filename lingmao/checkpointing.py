"""Checkpoint files: written atomically, read without running code, found and checked before a resume.

- `AtomicCheckpointIO` writes every checkpoint to a temporary file beside its target, fsyncs it and renames
  it over the old one, so a kill at any moment leaves the previous checkpoint loadable; it reads them with
  `torch.load(weights_only=True)`, so a crafted checkpoint cannot run code (it is refused with one line).
- `TrainingInterrupted` and `interrupts_exit_cleanly`: SIGINT / SIGTERM end a run with exit code 130 / 143
  (during training `lingmao.callbacks.fault_tolerance.SaveOnInterrupt` saves first).
- `find_resume_checkpoint` and `check_resume_compatible`: which checkpoint a run continues from, and whether
  it fits the model about to be trained. With auto-resume the candidates are `last.ckpt` and the epoch
  checkpoints, newest first (`resume_candidates`), each judged by one function (`resume_problem`); damaged ones
  are set aside as `<name>.damaged` and the run continues from the newest good one.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from lingmao.compat import batches_completed
from lingmao.data.tokenizer import tokenizer_fingerprint
from lingmao.errors import LingmaoError
from lingmao.io import atomic_write, fsync_dir
from lingmao.runs import check_same_settings, config_of_checkpoint, differences

log = logging.getLogger(__name__)

LAST, CRASH = "last.ckpt", "crash.ckpt"
META_KEY = "lingmao"
SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Model keys that do not change the shapes or the meaning of the weights: a resume may change them.
FREE_MODEL_KEYS = ("name", "dropout", "compile")
AFRESH = "to start afresh instead, add auto_resume=false (or choose another run_name); the checkpoint is kept"


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be a checkpoint, or None: a file written by torch.save (a zip archive), or a sharded
    checkpoint (a directory, `sharded_checkpoint_problem`). Reads only indexes."""
    if not path.exists():
        return f"{path}: checkpoint not found"
    if path.is_dir():
        return sharded_checkpoint_problem(path)
    return _archive_problem(path)


def _archive_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except PermissionError as exc:
        return f"{path}: cannot read the file ({exc.strerror})"
    except (zipfile.BadZipFile, OSError, EOFError):
        return f"{path}: not a checkpoint (not a torch.save archive; damaged or another kind of file)"
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return f"{path}: not a checkpoint (a zip archive without data.pkl)"
    return None


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", tensors: bool = True) -> dict[str, Any]:
    """`torch.load` with `weights_only=True`: tensors, numbers, strings and containers only, never code.

    Anything else (a pickled object whose loading would call a function) is refused with one line. A sharded
    checkpoint (a directory) is read whole into the same form (`load_sharded_checkpoint`); with
    `tensors=False` its `state_dict` holds tensors of the right shapes without their data.
    """
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem:
        raise LingmaoError(problem)
    if path.is_dir():
        return load_sharded_checkpoint(path, tensors)
    return _load_archive(path, map_location)


def _load_archive(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    ckpt = _safe_load(path, map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise LingmaoError(f"{path}: not a training checkpoint (no state_dict)")
    return ckpt


def _safe_load(path: Path, map_location: Any = "cpu", report_as: Path | None = None) -> Any:
    """`torch.load(weights_only=True)` of one file; errors name `report_as` (default: `path`)."""
    shown = report_as or path
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("Unsupported global:")[-1].split(".")[0].strip() if "Unsupported global" in str(
            exc) else "objects other than tensors and plain data"
        raise LingmaoError(
            f"{shown}: refused to load: the checkpoint holds {detail}, which could run code when unpickled; "
            "lingmao loads only checkpoints of tensors and plain data"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise LingmaoError(f"{shown}: cannot read the checkpoint ({str(exc).splitlines()[0]})") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic saves (temporary file in the checkpoint's own directory, fsync, `os.replace`) and safe loads.

    Lightning's default writes through a temporary location and a move, which is a plain copy (and leaves a
    partial file behind when killed) if that location is on another filesystem.
    """

    def __init__(self) -> None:
        super().__init__()
        self.saved: dict[str, tuple[int, int] | None] = {}  # path -> (global step, batches done) written there

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda f: torch.save(checkpoint, f))
        self.saved[str(Path(path).resolve())] = checkpoint_progress(checkpoint)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return load_checkpoint_file(path, map_location=map_location or "cpu")


def checkpoint_progress(checkpoint: dict[str, Any]) -> tuple[int, int] | None:
    """(global step, batches done) of a checkpoint's fit loop."""
    try:
        return int(checkpoint["global_step"]), batches_completed(checkpoint)
    except (KeyError, TypeError):
        return None


def remove_stale_temporaries(directory: str | Path) -> int:
    """Delete the temporary files a killed save left in `directory` (names as `lingmao.io.atomic_write` makes),
    and the staging folders of sharded checkpoints (`staging_path`)."""
    removed = 0
    for tmp in Path(directory).glob(".*.ckpt.*.tmp"):
        try:
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed += 1
        except OSError:
            pass
    return removed


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints (directories)
# ----------------------------------------------------------------------------------------------
# A sharded checkpoint (hardware=fsdp with hardware.fsdp.state_dict_type=sharded) is a directory: one file of
# shards per rank and `.metadata` (torch.distributed.checkpoint), and `meta.pt`, everything else (loops,
# callbacks, hyperparameters) as torch.save wrote it (Lightning's layout).
SHARDED_META, SHARDED_INDEX = "meta.pt", ".metadata"


def sharded_checkpoint_problem(path: Path) -> str | None:
    """Why directory `path` is not a sharded checkpoint, or None."""
    missing = [name for name in (SHARDED_META, SHARDED_INDEX) if not (path / name).is_file()]
    if missing:
        return f"{path}: is a directory but not a sharded checkpoint (no {' or '.join(missing)})"
    problem = _archive_problem(path / SHARDED_META)
    return problem and f"{path}: damaged sharded checkpoint ({problem})"


def load_sharded_checkpoint(path: Path, tensors: bool = True) -> dict[str, Any]:
    """A sharded checkpoint as one dictionary, in the layout of a checkpoint file: `state_dict` (whole tensors),
    `optimizer_states` (keyed by parameter name, which `Optimizer.load_state_dict` maps through the groups),
    and the rest from `meta.pt`. With `tensors=False`, `state_dict` holds shapes only (tensors on the meta
    device) and nothing else is read from the shards. In one process, without a process group."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = _safe_load(path / SHARDED_META, report_as=path)
    if not isinstance(ckpt, dict):
        raise LingmaoError(f"{path}: not a training checkpoint ({SHARDED_META} holds no dictionary)")
    if not tensors:
        metadata = FileSystemReader(str(path)).read_metadata()
        ckpt["state_dict"] = {
            ".".join(map(str, key[1:])): torch.empty(meta.size, dtype=meta.properties.dtype, device="meta")
            for flat, meta in metadata.state_dict_metadata.items()
            if (key := metadata.planner_data.get(flat, (flat,)))[0] == "state_dict" and hasattr(meta, "size")
        }
        return ckpt
    fd, whole = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        dcp_to_torch_save(path, whole)
        shards = _safe_load(Path(whole), report_as=path)
    except LingmaoError:
        raise
    except Exception as exc:  # torch.distributed.checkpoint's own errors: a damaged or partial directory
        raise LingmaoError(f"{path}: cannot read the sharded checkpoint ({str(exc).splitlines()[0]})") from None
    finally:
        Path(whole).unlink(missing_ok=True)
    ckpt["state_dict"] = shards.pop("state_dict", {})
    ckpt["optimizer_states"] = [shards[key] for key in sorted(shards, key=_optimizer_index)
                                if key.startswith("optimizer_")]
    return ckpt


def _optimizer_index(key: str) -> int:
    tail = key.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def staging_path(path: Path, token: str) -> Path:
    """Where a checkpoint for `path` is written before it is renamed into place (`remove_stale_temporaries`
    deletes those a kill left behind)."""
    return path.with_name(f".{path.name}.{token}.tmp")


def replace_checkpoint(staging: Path, path: Path) -> None:
    """Move the complete checkpoint `staging` (a file or a directory) to `path`, replacing what is there.

    A directory cannot be renamed over another, so the old one is first renamed aside (`.<name>.<token>.old`);
    a kill between the two renames leaves it there, and `recover_checkpoint` puts it back.
    """
    if path.is_dir() or (staging.is_dir() and path.exists()):
        aside = path.with_name(f".{path.name}.{staging.name.split('.')[-2]}.old")
        os.rename(path, aside)
        os.rename(staging, path)
        fsync_dir(path.parent)
        shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink(missing_ok=True)
    else:
        os.replace(staging, path)
        fsync_dir(path.parent)


def recover_checkpoint(path: Path) -> None:
    """Put back the previous checkpoint that `replace_checkpoint` renamed aside when it was killed before the new
    one took its place. Harmless when another process does it at the same moment."""
    if path.exists():
        return
    for aside in sorted(path.parent.glob(f".{path.name}.*.old")):
        try:
            os.rename(aside, path)
            log.warning("%s: put back the checkpoint a killed save had renamed to %s", path, aside.name)
            return
        except OSError:
            continue


# ----------------------------------------------------------------------------------------------
# Interrupts
# ----------------------------------------------------------------------------------------------
class TrainingInterrupted(BaseException):
    """Raised after SIGINT / SIGTERM; `exit_code` is the shell convention 128 + signal number.

    A BaseException like KeyboardInterrupt (so `except Exception` does not swallow it), but not a
    KeyboardInterrupt, which Lightning turns into exit code 1.
    """

    def __init__(self, signum: int, checkpoint: Path | None = None, step: int | None = None) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step
        self.after_pid: int | None = None  # exit only once this process (the launching rank 0) has exited
        super().__init__(self.message())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        name = signal.Signals(self.signum).name
        if self.checkpoint is None:
            return f"interrupted by {name}; no checkpoint was written by this run since it started"
        return (
            f"interrupted by {name}: saved step {self.step} to {self.checkpoint}\n"
            f"to continue, run the same command again (auto_resume=true), or add resume_from={self.checkpoint}"
        )


class InterruptState:
    """Process-wide: which signal arrived, and whether a training loop will act on it at a step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False  # True while a training loop will handle the signal at a step boundary
        self.handling = False  # the interrupt is being acted on: further signals are only reported

    def handler(self, signum: int, frame: Any) -> None:
        if self.handling or (self.signum is not None and self.deferred):
            print(
                f"\n{signal.Signals(signum).name} again: still saving the checkpoint, please wait "
                f"(kill -9 {os.getpid()} stops without it; the previous checkpoint stays loadable)",
                file=sys.stderr, flush=True,
            )
            return
        self.signum = signum
        if not self.deferred:
            self.handling = True
            raise TrainingInterrupted(signum)
        print(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint after the current step ...",
            file=sys.stderr, flush=True,
        )


INTERRUPTS = InterruptState()


def can_set_signals() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def interrupts_exit_cleanly() -> Iterator[None]:
    """Outside training loops, SIGINT / SIGTERM raise `TrainingInterrupted` at once (exit 130 / 143)."""
    if not can_set_signals():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    INTERRUPTS.__init__()
    for s in SIGNALS:
        signal.signal(s, INTERRUPTS.handler)
    try:
        yield
    finally:
        # After an interruption the process is on its way out with 130 / 143: a further Ctrl-C must not turn
        # that into death by signal, so the signals stay caught (ignored) instead of getting their old handlers.
        interrupted = INTERRUPTS.signum is not None
        for s, h in previous.items():
            signal.signal(s, signal.SIG_IGN if interrupted else h)


# ----------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------
def find_resume_checkpoint(resume_from: str | None, auto_resume: bool, checkpoint_dir: Path) -> Path | None:
    """`resume_from` if given, else the newest good checkpoint of the run when `auto_resume` (see
    `newest_good_checkpoint`), else None (a fresh start)."""
    if resume_from:
        path = Path(resume_from)
        if not path.exists():
            raise LingmaoError(f"resume_from: checkpoint {path} not found")
        return path
    recover_checkpoint(checkpoint_dir / LAST)  # a sharded last.ckpt a killed save had set aside
    candidates = resume_candidates(checkpoint_dir)
    if auto_resume and candidates:
        return newest_good_checkpoint(candidates)
    if candidates:
        log.info("auto_resume=false: starting afresh; %s stays until this run saves its own", candidates[0])
    return None


def resume_candidates(checkpoint_dir: Path) -> list[Path]:
    """The checkpoints auto-resume may continue from, newest first: `last.ckpt` (it holds the latest step: it
    is refreshed every few steps and at the end), then the epoch checkpoints, newest first. `crash.ckpt` only
    by `resume_from=`: it may hold the step that crashed."""
    epochs = sorted(checkpoint_dir.glob("epoch*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
    return [p for p in (checkpoint_dir / LAST, *epochs) if p.exists()]


def resume_problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from (missing, damaged, not a training checkpoint), or None. A
    sharded checkpoint (a directory) is judged by its index and metadata, without reading its shards."""
    try:
        load_checkpoint_file(path, tensors=False)
    except LingmaoError as exc:
        return str(exc)
    return None


def newest_good_checkpoint(candidates: list[Path]) -> Path:
    """The first of `candidates` (newest first) that `resume_problem` finds nothing wrong with; the damaged ones
    before it are renamed `<name>.damaged` (kept, and out of the next run's way). When none is good, the newest
    one's problem is a one-line LingmaoError and nothing is renamed."""
    problems: list[tuple[Path, str]] = []
    for path in candidates:
        problem = resume_problem(path)
        if problem is None:
            for damaged, why in problems:
                kept = set_aside(damaged)
                log.warning("%s; kept as %s", why, kept.name if kept else damaged.name)
            if problems:
                log.warning("resuming from %s, the newest good checkpoint", path)
            return path
        problems.append((path, problem))
    raise LingmaoError(f"{problems[0][1]}; {AFRESH}")


@rank_zero_only
def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `<name>.damaged` (`<name>.N.damaged` when that is taken)."""
    target, n = path.with_name(f"{path.name}.damaged"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.{n}.damaged"), n + 1
    os.replace(path, target)
    return target


def check_resume_compatible(
    path: str | Path, model_cfg: dict[str, Any], vocab_size: int, state_dict: dict[str, torch.Tensor],
    tokenizer_fingerprint: str | None = None, training_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stop with a `LingmaoError` listing every difference when checkpoint `path` cannot resume into a model
    of `model_cfg` (a ModelConfig as a dict) with `state_dict` (and the settings that differ from
    `training_config`, which explain it).

    Returns the checkpoint's {"epoch", "global_step", "hyper_parameters"}, for the log and the schedule check.
    """
    path = Path(path)
    try:
        ckpt = load_checkpoint_file(path, tensors=False)
    except LingmaoError as exc:
        raise LingmaoError(f"{exc}; {AFRESH}") from None
    diffs: list[str] = []
    hp = ckpt.get("hyper_parameters") or {}
    old_model = dict(hp.get("model") or {})
    if old_model and "arch" in model_cfg:
        old_model.setdefault("arch", "design")  # checkpoints from before the modern decoder
    for key, value in model_cfg.items():
        if key in FREE_MODEL_KEYS or key not in old_model:
            continue
        if old_model[key] != value:
            diffs.append(f"model.{key}: checkpoint {old_model[key]!r}, now {value!r}")
    if "vocab_size" in hp and hp["vocab_size"] != vocab_size:
        diffs.append(f"vocabulary size: checkpoint {hp['vocab_size']}, now {vocab_size}")
    old_tok = (ckpt.get(META_KEY) or {}).get("tokenizer")
    if tokenizer_fingerprint and old_tok and old_tok != tokenizer_fingerprint:
        diffs.append("tokenizer: another vocabulary or settings than the checkpoint's (data.tokenizer_path, data.*)")
    if not diffs:  # config keys agree: compare the tensors themselves
        old_sd = ckpt["state_dict"]
        for key in sorted(set(old_sd) | set(state_dict)):
            if key not in state_dict:
                diffs.append(f"{key}: only in the checkpoint")
            elif key not in old_sd:
                diffs.append(f"{key}: missing from the checkpoint")
            elif tuple(old_sd[key].shape) != tuple(state_dict[key].shape):
                diffs.append(f"{key}: checkpoint shape {tuple(old_sd[key].shape)}, now {tuple(state_dict[key].shape)}")
    if diffs and training_config is not None:  # the settings behind it (a template, a conversion ...)
        diffs += [d for d in differences(config_of_checkpoint(ckpt), training_config) if d not in diffs]
    if diffs:
        shown = "; ".join(diffs[:12]) + (f"; ... ({len(diffs) - 12} more)" if len(diffs) > 12 else "")
        raise LingmaoError(f"{path} does not match this run: {shown}. Use the checkpoint's settings, or {AFRESH}")
    return {"epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step"), "hyper_parameters": hp,
            "config": config_of_checkpoint(ckpt), "world_size": (ckpt.get(META_KEY) or {}).get("world_size")}


def resume_point(conf: Any, run_dir: Path, lm: Any, tokenizer: Any, world_size: int | None = None) -> Path | None:
    """The checkpoint this run continues from (None: a fresh start), checked against the model about to be
    trained and against the run's training config (`lingmao.runs`; `lm.training_config`); says in one line how
    the learning-rate schedule differs from the checkpoint's run, and how the batches change when `world_size`
    (this run's processes) is not the checkpoint's."""

    path = find_resume_checkpoint(conf.resume_from, conf.auto_resume, run_dir / "checkpoints")
    if path is None:
        return None
    at = check_resume_compatible(
        path, dict(lm.hparams["model"]), int(lm.hparams["vocab_size"]), lm.state_dict(),
        tokenizer_fingerprint(tokenizer), lm.training_config,
    )
    if lm.training_config is not None:
        check_same_settings(path, at["config"], lm.training_config, conf.resume_changed == "accept")
    log.info("resuming from %s: epoch %s, step %s", path, at["epoch"], at["global_step"])
    if world_size and at["world_size"] and at["world_size"] != world_size:
        log.info(world_size_change(at["world_size"], world_size))
    changes = schedule_changes(at["hyper_parameters"], dict(lm.hparams))
    if changes:
        log.info("the learning-rate schedule follows this run's settings from step %s on: %s",
                 at["global_step"], "; ".join(changes))
    return path


def world_size_change(before: int, now: int) -> str:
    """What resuming on another number of processes does to the batches (docs/hardware.md)."""
    return (
        f"the checkpoint was written by {before} process{'es' if before > 1 else ''}, this run has {now}: the rest of "
        f"the epoch's order is dealt to {now} (each window once); each optimizer step now takes {now} x "
        "data.batch_size windows, so the batches (and the weights) differ from a run that kept "
        f"{before} process{'es' if before > 1 else ''}"
    )


def schedule_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`trainer.max_steps 30 -> 60`-style phrases for the schedule settings that differ between two runs."""
    changes = []
    for group, keys in (("trainer", ("max_steps", "max_epochs")),
                        ("optim", ("lr", "warmup_steps", "min_lr_ratio", "name"))):
        source = "schedule" if group == "trainer" else "optim"
        before, after = old.get(source) or {}, new.get(source) or {}
        for key in keys:
            if key in before and before.get(key) != after.get(key):
                changes.append(f"{group}.{key} {before.get(key)} -> {after.get(key)}")
    before, after = (old.get("optim") or {}).get("muon") or {}, (new.get("optim") or {}).get("muon") or {}
    for key in ("lr", "warmup_steps", "min_lr_ratio"):
        if key in before and before.get(key) != after.get(key):
            changes.append(f"optim.muon.{key} {before.get(key)} -> {after.get(key)}")
    return changes
