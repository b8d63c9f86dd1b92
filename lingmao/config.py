"""The configuration of a run: typed dataclasses that Hydra composes, checked once, with one-line errors.

Each group's keys are declared once, as a dataclass beside the code that uses them (`ModelConfig` in
`lingmao/model.py`, `OptimConfig` in `lingmao/optim.py`, `DataConfig` in `lingmao/data`, `HardwareConfig`,
`NightConfig`, `LoggerConfig`); this module adds the run-level keys, registers every dataclass in Hydra's
ConfigStore (the YAML options extend them: `defaults: [/schema/model@_here_]`), so Hydra and OmegaConf reject
unknown keys and values of the wrong type, and `validate` turns the composed config into the dataclasses,
whose `__post_init__` checks ranges and the rules that involve several keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException, ValidationError

from lingmao import names
from lingmao.callbacks.night import NightConfig
from lingmao.checks import check_fields, choice, number, show
from lingmao.cli import CONF_DIR, describe_hydra_error, describe_validation_error, first_line, unknown_key_message
from lingmao.data import DataConfig
from lingmao.errors import LingmaoError
from lingmao.hardware import HardwareConfig
from lingmao.loggers import LoggerConfig
from lingmao.model import ModelConfig
from lingmao.optim import OptimConfig, check_strategy

CORPUS_DIR = Path(__file__).parent / "corpus"

@dataclass
class PathsConfig:
    """Where a run writes. `run_dir` is `runs_dir/<run name>` (see `lingmao.names`)."""

    KEY: ClassVar[str] = "paths"
    output_dir: str = "outputs"
    runs_dir: str = "${paths.output_dir}/runs"
    cache_dir: str = "${paths.output_dir}/cache"
    run_dir: str = "${paths.runs_dir}/${lingmao.run_name:${run_name}}"

    def __post_init__(self) -> None:
        for key in ("output_dir", "runs_dir", "cache_dir", "run_dir"):
            path = Path(getattr(self, key))
            if path.exists() and not path.is_dir():
                raise LingmaoError(f"paths.{key}: {path} exists and is not a directory")


@dataclass
class TrainerConfig:
    """Arguments handed to `lightning.Trainer` (the rest come from hardware.*, optim.* and the callbacks)."""

    KEY: ClassVar[str] = "trainer"
    max_epochs: int | None = number(-1, ge=-1)  # the design's `epochs` (-1 = no limit: max_steps decides)
    max_steps: int = number(800, ge=-1)  # optimizer steps (-1 = no limit: max_epochs decides)
    min_epochs: int | None = number(None, ge=0)
    min_steps: int | None = number(None, ge=0)
    val_check_interval: Any = 200  # validate every N training batches (counted across epochs), or a fraction
    check_val_every_n_epoch: int | None = number(None, ge=1)  # null: val_check_interval counts across epochs
    limit_train_batches: Any = None
    limit_val_batches: Any = 1.0
    limit_test_batches: Any = None
    log_every_n_steps: int = number(10, ge=1)
    num_sanity_val_steps: int = number(0, ge=-1)
    deterministic: Any = False
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    fast_dev_run: Any = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.max_steps in (-1, None) and self.max_epochs in (-1, None) and not self.fast_dev_run:
            raise LingmaoError(
                f"trainer.max_steps={self.max_steps} and trainer.max_epochs={show(self.max_epochs)}: the run would "
                "never end; set trainer.max_steps (optimizer steps) or trainer.max_epochs"
            )
        interval = self.val_check_interval
        if isinstance(interval, bool) or not isinstance(interval, int | float | None) or (
            isinstance(interval, float) and not 0 < interval <= 1) or (isinstance(interval, int) and interval < 1):
            raise LingmaoError(
                f"trainer.val_check_interval={show(interval)}: allowed: a number of batches >= 1, or a fraction of "
                "an epoch in (0, 1]"
            )


@dataclass
class TrainConfig:
    """Everything `python -m lingmao.train` reads: the groups and the run-level keys."""

    KEY: ClassVar[str] = ""
    model: ModelConfig = MISSING
    optim: OptimConfig = MISSING
    data: DataConfig = MISSING
    hardware: HardwareConfig = MISSING
    night: NightConfig = MISSING
    logger: LoggerConfig = MISSING
    callbacks: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = number(1337, ge=0, le=2**32 - 1)
    # The run's folder under paths.runs_dir, where its checkpoints live, so re-running the same command finds
    # them. null = made of the command-line overrides that change what is trained ("default" when none).
    run_name: str | None = None
    auto_resume: bool = True  # continue from <run dir>/checkpoints/last.ckpt when it exists
    resume_from: str | None = None  # or resume from this checkpoint
    # A resume whose training settings differ from the checkpoint's is refused; accept = continue with the new ones.
    resume_changed: str = choice("refuse", "refuse", "accept")
    # Fine-tuning (lingmao/finetune.py): start from the weights and tokenizer of an export or a .ckpt, with a fresh
    # optimizer and schedule; init_from_extend_vocab adds the training data's tokens the tokenizer lacks.
    init_from: str | None = None
    init_from_extend_vocab: bool = False
    save_on_interrupt: bool = True  # Ctrl-C / SIGTERM save a checkpoint before exiting
    checkpoint_every: int = number(1, ge=0)  # keep an epoch checkpoint every N epochs (0 = none)
    checkpoint_every_n_steps: int = number(200, ge=0)  # refresh last.ckpt every N optimizer steps (0 = epoch ends)
    model_save_dir: str | None = None  # the final export; null = <run dir>/export
    export: bool = True
    run_test: bool = True  # evaluate on data.test_file after training
    show_samples: bool = True  # print a 五绝 and a 七绝 from the trained model at the end
    debug: bool = False  # full tracebacks for user errors too

    def __post_init__(self) -> None:
        check_fields(self)
        check_context(self)
        check_strategy(self.optim, self.hardware.strategy)
        if self.resume_from:
            from lingmao.checkpointing import checkpoint_problem

            problem = checkpoint_problem(Path(self.resume_from))
            if problem:
                raise LingmaoError(f"resume_from: {problem}")
        if self.model_save_dir:
            self._check_export_dir(Path(self.model_save_dir))
        if self.init_from:
            from lingmao.finetune import init_problem

            problem = init_problem(Path(self.init_from))
            if problem:
                raise LingmaoError(f"init_from: {problem}")

    def _check_export_dir(self, target: Path) -> None:
        from lingmao.export import export_problem

        keep = {f"paths.{k}": getattr(self.paths, k) for k in ("output_dir", "runs_dir", "cache_dir")}
        keep.update({f"data.{k}": getattr(self.data, k) for k in ("test_file", "tokenizer_path") if getattr(
            self.data, k)})
        if isinstance(self.data.train_file, str):
            keep["data.train_file"] = self.data.train_file
        keep["the current directory"] = "."
        resolved = target.resolve()
        for what, other in keep.items():
            other_path = Path(other).resolve()
            if resolved == other_path or resolved in other_path.parents:
                raise LingmaoError(
                    f"model_save_dir: {target} holds {what} ({other}): choose a folder of the export's own"
                )
        problem = export_problem(target)
        if problem:
            raise LingmaoError(f"model_save_dir: {problem}")


def check_context(conf: TrainConfig) -> None:
    """data.context_length must fit the model (also the model an `init_from` run takes from its source)."""
    if conf.data.context_length > conf.model.max_len:
        raise LingmaoError(
            f"data.context_length={conf.data.context_length} exceeds the longest sequence the model takes, "
            f"model.max_len={conf.model.max_len}; lower data.context_length or raise model.max_len"
        )


# ----------------------------------------------------------------------------------------------
# Registration and resolvers
# ----------------------------------------------------------------------------------------------
SCHEMAS: dict[str, type] = {
    "model": ModelConfig, "optim": OptimConfig, "data": DataConfig, "hardware": HardwareConfig,
    "night": NightConfig, "logger": LoggerConfig,
}


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def register_configs() -> None:
    """The schemas (`/schema/<group>` in ConfigStore, extended by the YAML options) and the resolvers."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, schema in SCHEMAS.items():
        cs.store(group="schema", name=group, node=schema)
    OmegaConf.register_new_resolver("lingmao.corpus", lambda rel: str(CORPUS_DIR / rel), replace=True)
    OmegaConf.register_new_resolver(
        "lingmao.run_name", lambda given: names.run_name(given, _task_overrides()), replace=True
    )
    OmegaConf.register_new_resolver(
        "lingmao.job_dirname", lambda: names.name_from_overrides(_task_overrides(), keep_all=True) or "default",
        replace=True,
    )


register_configs()


# ----------------------------------------------------------------------------------------------
# Checking a composed config
# ----------------------------------------------------------------------------------------------
def validate(cfg: DictConfig) -> TrainConfig:
    """The composed config as dataclasses, or one LingmaoError naming the key at fault.

    Reads no data: only the config and the existence (stat) of the files it names.
    """
    unknown = unknown_keys(cfg)
    if unknown:
        raise LingmaoError(unknown_key_message(unknown[0], TrainConfig))
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        key = str(exc.full_key)
        hint = f" (e.g. {key}=path/to/file.jsonl)" if key.endswith("_file") else ""
        raise LingmaoError(f"{key}: a value is required{hint}") from None
    except ValidationError as exc:
        raise LingmaoError(describe_validation_error(exc)) from None
    except OmegaConfBaseException as exc:
        raise LingmaoError(f"{getattr(exc, 'full_key', '') or 'config'}: {first_line(exc)}") from None


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Full keys in `cfg` that its dataclass does not declare (Hydra's `+key=value` adds them unchecked)."""
    schema = OmegaConf.get_type(cfg)
    declared = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    found: list[str] = []
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if declared is not None and key not in declared:
            found.append(full)
        elif not (OmegaConf.is_missing(cfg, key) or OmegaConf.is_interpolation(cfg, key)):
            child = cfg[key]
            if isinstance(child, DictConfig):
                found += unknown_keys(child, f"{full}.")
    return found


# ----------------------------------------------------------------------------------------------
# Composing from Python
# ----------------------------------------------------------------------------------------------
def compose_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with `overrides` as the command line would (for Python callers and
    tests); a composition error of the user's is a one-line LingmaoError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    try:
        if GlobalHydra.instance().is_initialized():
            return compose(config_name, overrides=list(overrides or []))
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=list(overrides or []))
    except HydraException as exc:
        message = describe_hydra_error(exc, TrainConfig)
        if message is None:
            raise
        raise LingmaoError(message) from None


