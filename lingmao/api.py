"""`lingmao.train_model(...)`: the original design's call, from Python, through the same config and pipeline
as `python -m lingmao.train`.

Every parameter of the design keeps its name and meaning; each becomes the config override the command line
would use, so the composed config is the same typed one, checked the same way, and a mistake is the same
one-line `LingmaoError`.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Iterator
from typing import Any

from lingmao import names
from lingmao.errors import LingmaoError

# design parameter -> config key (None: handled below)
PARAMETERS: dict[str, str | None] = {
    "train_file": "data.train_file", "test_file": "data.test_file", "val_file": "data.val_file",
    "tokenizer_path": "data.tokenizer_path", "context_length": "data.context_length", "batch_size": "data.batch_size",
    "stride": "data.stride", "d_model": "model.d_model", "nhead": "model.nhead", "num_layers": "model.num_layers",
    "dim_feedforward": "model.dim_feedforward", "dropout": "model.dropout", "learning_rate": "optim.lr",
    "weight_decay": "optim.weight_decay", "max_grad_norm": "optim.max_grad_norm", "warmup_steps": "optim.warmup_steps",
    "accumulation_steps": "optim.accumulation_steps", "checkpoint_every": "checkpoint_every",
    "resume_from": "resume_from", "auto_resume": "auto_resume", "save_on_interrupt": "save_on_interrupt",
    "model_save_dir": "model_save_dir", "run_name": "run_name", "seed": "seed",
    "epochs": None, "use_amp": None, "device": None, "night_mode": None,
}


def _value(value: Any) -> str:
    """A Python value as Hydra's override grammar reads it (strings quoted, so any path is taken as it is)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def design_overrides(params: dict[str, Any]) -> list[str]:
    """The config overrides for the design's keyword arguments (unknown names: a one-line LingmaoError)."""
    out: list[str] = []
    for name, value in params.items():
        if name not in PARAMETERS:
            close = difflib.get_close_matches(name, list(PARAMETERS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise LingmaoError(
                f"{name}: unknown parameter of train_model{hint}; parameters: {', '.join(PARAMETERS)}, overrides"
            )
        key = PARAMETERS[name]
        if key is not None:
            out.append(f"{key}={_value(value)}")
        elif name == "epochs":  # the design trains for a number of epochs
            out += [f"trainer.max_epochs={_value(value)}", "trainer.max_steps=-1"]
        elif name == "use_amp":  # mixed precision where the device has it (bf16 or fp16 on CUDA), else fp32
            out.append(f"hardware.precision={'auto' if value else '32-true'}")
        elif name == "device":
            out.append(f"hardware={value}")
        elif name == "night_mode":
            out.append(f"night.enabled={_value(bool(value))}")
    if "train_file" in params:
        out.insert(0, "data=jsonl")
    return out


def train_model(overrides: list[str] | None = None, progress: bool = True, **params: Any) -> Any:
    """Train, test and export a model; return a `lingmao.train.TrainResult` (best and last validation loss, the
    test figures, the run, checkpoint and export folders).

    Keyword arguments are the design's (train_file, test_file, model_save_dir, batch_size, learning_rate,
    epochs, d_model, nhead, num_layers, context_length, use_amp, accumulation_steps, night_mode, ...: see
    `PARAMETERS`); `overrides` takes any other config key as on the command line (`["model.arch=design"]`).
    `progress=True` prints what the command line prints as the run goes (progress lines or bar, validations,
    the summary) on stderr, unless your logging already shows lingmao's messages; `progress=False` is silent
    but for warnings. A stop by SIGINT / SIGTERM raises `lingmao.checkpointing.TrainingInterrupted` after
    saving a checkpoint.
    """
    from lingmao.config import compose_config
    from lingmao.train import train

    args = [*design_overrides(params), *(overrides or [])]
    if not any(a.split("=", 1)[0].lstrip("+~") == "run_name" for a in args):
        args.append(f"run_name={names.run_name(None, args)}")  # as the command line names its runs
    if not progress:
        args.append("trainer.enable_progress_bar=false")
    with shown_messages() if progress else contextlib.nullcontext():
        return train(compose_config(args))


@contextlib.contextmanager
def shown_messages() -> Iterator[None]:
    """lingmao's messages on stderr for the duration, as the command line shows them (Hydra's logging setup),
    when the caller's logging would not show them; nothing changes when it already does."""
    logger = logging.getLogger("lingmao")
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        yield
        return
    handler = logging.StreamHandler()  # sys.stderr as it is now
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the caller's own handlers would print the lines a second time
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate

