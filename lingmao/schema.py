"""The typed check of a composed config: every key, type, range and cross-field rule, before any data is read.

Which keys exist is read from the YAML defaults in `conf/` (the keys of every option of a group, e.g. all
of `conf/model/*.yaml`) together with the tables below; the tables add the type, the allowed values and
the range of the keys they name. So a key added to a YAML file later is accepted at once (checked
against the type of its default) and a typo such as `+optim.lr_rate=1` is refused, naming the allowed
keys. `tests/test_errors.py` checks that the tables cover every key of the shipped YAML files.
This is a check of the composed config rather than dataclasses in Hydra's ConfigStore: the YAML files
stay the one place where defaults live, composition and `--cfg job` / `-m` work as before, and the
messages can name the allowed values and ranges, which OmegaConf's type errors do not.

`report_config_errors` turns Hydra's own composition errors (an override of a key that does not exist,
an unknown group option, an override that does not parse) into the same one-line `error: ...` and
exit code 2.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from lingmao.config import CONF_DIR
from lingmao.data import config as data_config
from lingmao.errors import LingmaoError, traceback_wanted
from lingmao.hardware import ACCELERATORS, resolve_accelerator

_NUMBER = (int, float)
MAX_SHOWN_ERRORS = 3


@dataclass(frozen=True)
class Key:
    """What one config key accepts: types, or a fixed set of choices, and an optional range."""

    types: tuple[type, ...] = ()
    nullable: bool = False
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low < value instead of low <= value
    high_open: bool = False

    def describe(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(dict.fromkeys(str(c) for c in self.choices))
        else:
            names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}
            kinds = [names[t] for t in self.types if not (t is int and float in self.types)]
            text = " or ".join(kinds) or "any value"
            if self.low is not None and self.high is not None:
                left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
                text += f" in {left}{_num(self.low)}, {_num(self.high)}{right}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {_num(self.low)}"
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {_num(self.high)}"
        return f"null or {text}" if self.nullable else text

    def problem(self, value: Any) -> str | None:
        """None when `value` is acceptable, else what is wrong with it."""
        if value is None:
            return None if self.nullable else "a value is required"
        if self.choices:
            return None if value in self.choices and not isinstance(value, bool) else "not allowed"
        if not any(_is_a(value, t) for t in self.types):
            return f"wrong type ({type(value).__name__})"
        if isinstance(value, _NUMBER) and not isinstance(value, bool):
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                return "out of range"
            if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
                return "out of range"
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _is_a(value: Any, t: type) -> bool:
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, _NUMBER) and not isinstance(value, bool)
    if t is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, t)


def _int(low: float | None = None, *, nullable: bool = False, high: float | None = None) -> Key:
    return Key((int,), nullable, low=low, high=high)


def _float(low: float | None = None, high: float | None = None, *, nullable: bool = False, low_open: bool = False,
           high_open: bool = False) -> Key:
    return Key((float,), nullable, low=low, high=high, low_open=low_open, high_open=high_open)


def _choice(*choices: Any, nullable: bool = False) -> Key:
    return Key((), nullable, choices=choices)


BOOL, STR, OPT_STR = Key((bool,)), Key((str,)), Key((str,), nullable=True)
FRACTION = _float(0, 1, nullable=True, low_open=True)  # (0, 1] or null
PRECISIONS = (
    "auto", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true", "64",
    "transformer-engine", "transformer-engine-float16", 16, 32, 64,
)

# The keys of each group; `tests/test_errors.py` checks these cover the shipped YAML files.
SCHEMA: dict[str, dict[str, Key | None]] = {
    "model": {
        "name": STR, "d_model": _int(1), "nhead": _int(1), "num_layers": _int(1), "dim_feedforward": _int(1),
        "dropout": _float(0, 1, high_open=True), "max_len": _int(1), "tie_weights": BOOL, "norm_first": BOOL,
        "activation": _choice("gelu", "relu"), "compile": BOOL,
    },
    "optim": {
        "name": STR, "lr": _float(0, low_open=True), "weight_decay": _float(0),
        "betas": Key((list,)), "eps": _float(0, low_open=True), "warmup_steps": _int(0),
        "min_lr_ratio": _float(0, 1), "max_grad_norm": _float(0, nullable=True, low_open=True),
        "accumulation_steps": _int(1), "fused": Key((bool,), nullable=True),
    },
    "data": {  # train/val/test_file: a path, directory or glob, or a list of them (lingmao/data/reading.py)
        "name": STR, "train_file": Key((str, list)), "val_file": Key((str, list), nullable=True),
        "val_fraction": _float(0, 1, high_open=True), "test_file": Key((str, list), nullable=True),
        "tokenizer_path": OPT_STR, "context_length": _int(1),
        "batch_size": _int(1), "stride": _int(1, nullable=True), "eval_stride": _int(1, nullable=True),
        "packing": BOOL, "text_key": STR, "template": OPT_STR, "txt_mode": _choice("block", "file"),
        "convert": _choice("none", "t2s", "s2t"),
        "on_bad_line": _choice("error", "skip"), "min_frequency": _int(1), "num_workers": _int(0),
    },
    "hardware": {
        "name": STR, "accelerator": _choice(*ACCELERATORS), "devices": Key((int, str, list)),
        "strategy": STR, "num_nodes": _int(1), "precision": _choice(*PRECISIONS, nullable=True),
        "gpu_memory_fraction": FRACTION, "empty_cache_every_n_steps": _int(0), "cpu_threads": _int(1, nullable=True),
        "matmul_precision": _choice("highest", "high", "medium", nullable=True),
        "ddp": None, "fsdp": None,  # strategy settings: mappings whose keys are those of the YAML files
    },
    "night": {
        # start, end, now: times, checked with lingmao.night's own parser (a list of times is allowed for now)
        "enabled": BOOL, "start": None, "end": None, "now": None, "batch_size_factor": _float(0, 1, low_open=True),
        "lr_factor": _float(0, low_open=True), "keep_effective_batch": BOOL,
        "cpu_fraction": _float(0, 1, low_open=True), "gpu_memory_fraction": _float(0, 1, low_open=True),
        "check_every_n_steps": _int(0),
    },
    "paths": {"output_dir": STR, "runs_dir": STR, "cache_dir": STR},
    "trainer": {
        "max_epochs": _int(-1, nullable=True), "max_steps": _int(-1), "min_epochs": _int(0, nullable=True),
        "min_steps": _int(0, nullable=True), "val_check_interval": _float(0, nullable=True, low_open=True),
        "check_val_every_n_epoch": _int(1, nullable=True), "limit_train_batches": _float(0, nullable=True),
        "limit_val_batches": _float(0, nullable=True), "limit_test_batches": _float(0, nullable=True),
        "log_every_n_steps": _int(1, nullable=True), "num_sanity_val_steps": _int(-1, nullable=True),
        "deterministic": Key((bool, str), nullable=True), "enable_progress_bar": Key((bool,), nullable=True),
        "enable_model_summary": Key((bool,), nullable=True), "fast_dev_run": Key((bool, int)),
    },
}
RUN_KEYS: dict[str, Key] = {
    "seed": _int(0, high=2**32 - 1), "run_name": OPT_STR, "auto_resume": BOOL, "resume_from": OPT_STR,
    "save_on_interrupt": BOOL,
    "checkpoint_every": _int(0), "checkpoint_every_n_steps": _int(0), "model_save_dir": OPT_STR, "export": BOOL,
    "run_test": BOOL, "debug": BOOL,
}
# Trainer arguments that train.py sets from other keys: setting them under trainer.* is refused.
TRAINER_SET_ELSEWHERE = {
    "accelerator": "hardware.accelerator", "devices": "hardware.devices", "num_nodes": "hardware.num_nodes",
    "strategy": "hardware.strategy", "precision": "hardware.precision", "callbacks": "the run keys",
    "accumulate_grad_batches": "optim.accumulation_steps", "gradient_clip_val": "optim.max_grad_norm",
    "logger": "the logger group", "default_root_dir": "paths.runs_dir",
}


# ----------------------------------------------------------------------------------------------
# Allowed keys: the tables above plus whatever the shipped YAML files define
# ----------------------------------------------------------------------------------------------
@functools.cache
def yaml_defaults(conf_dir: str = str(CONF_DIR)) -> dict[str, dict[str, tuple[Any, ...]]]:
    """{group: {key: (default values seen in the YAML options...)}}; '' is the top level of train.yaml."""
    found: dict[str, dict[str, list[Any]]] = {}

    def add(group: str, mapping: Any) -> None:
        if not isinstance(mapping, dict):
            return
        for key, value in mapping.items():
            if key not in ("defaults", "hydra"):
                found.setdefault(group, {}).setdefault(str(key), []).append(value)

    root = Path(conf_dir)
    for path in sorted(root.glob("*/*.yaml")):
        add(path.parent.name, _load_yaml(path))
    top = _load_yaml(root / "train.yaml")
    if isinstance(top, dict):
        add("", {k: v for k, v in top.items() if not isinstance(v, dict)})
        for name, value in top.items():
            if isinstance(value, dict) and name != "hydra":
                add(name, value)
    for group_dir in root.iterdir():
        if group_dir.is_dir():
            found.setdefault("", {}).setdefault(group_dir.name, [])
    return {g: {k: tuple(v) for k, v in keys.items()} for g, keys in found.items()}


def _load_yaml(path: Path) -> Any:
    """Plain YAML (libyaml when present): a few ms for all of conf/, where OmegaConf.load takes ~0.3 s."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=loader)


def allowed_keys(group: str) -> dict[str, Key | None]:
    """Every key `group` may hold ('' = top level, 'hardware.ddp' = a nested mapping), with its Key where
    known (None: not checked here)."""
    if "." in group:  # a mapping inside a group: the keys its YAML defaults have
        parent, _, name = group.partition(".")
        defaults = yaml_defaults().get(parent, {}).get(name, ())
        return {str(k): None for d in defaults if isinstance(d, dict) for k in d}
    yaml = yaml_defaults().get(group, {})
    known: dict[str, Key | None] = dict(RUN_KEYS if group == "" else SCHEMA.get(group, {}))
    if group == "":
        known.update({g: None for g in SCHEMA})
    if group == "trainer":
        known.update({k: None for k in _trainer_parameters() if k not in known})
    for key, defaults in yaml.items():
        known.setdefault(key, _key_from_defaults(defaults))
    return known


@functools.lru_cache(maxsize=1)
def _trainer_parameters() -> tuple[str, ...]:
    import lightning as L

    return tuple(p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self")


def _key_from_defaults(defaults: Iterable[Any]) -> Key | None:
    """The loose type of a key only the YAML files know: that of its (non-null) defaults."""
    defaults = list(defaults)
    types: set[type] = set()
    for value in defaults:
        if value is None or (isinstance(value, str) and value.startswith("${")):
            continue
        types.add(bool if isinstance(value, bool) else float if isinstance(value, float) else
                  int if isinstance(value, int) else str if isinstance(value, str) else
                  list if isinstance(value, list) else dict)
    if not types or dict in types or (str in types and len(types) > 1):
        return None
    if float in types:
        types.discard(int)
    return Key(tuple(sorted(types, key=lambda t: t.__name__)), nullable=None in defaults or not defaults)


def unknown_key_message(full_key: str) -> str:
    """`optim.lr_rate: unknown key (did you mean optim.lr?); optim keys: ...`."""
    group, _, key = full_key.rpartition(".")
    allowed = sorted(allowed_keys(group))
    where = f"{group} keys" if group else "top-level keys"
    close = sorted((k for k in allowed if len(k) > 1 and (key.startswith(k) or k.startswith(key))), key=len)[-1:]
    close = close or difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {group + '.' if group else ''}{close[0]}?)" if close else ""
    return f"{full_key}: unknown key{hint}; {where}: {', '.join(allowed)}"


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------
def validate_config(cfg: DictConfig) -> None:
    """Raise one LingmaoError listing what is wrong with `cfg` (keys, types, ranges, files), or return.

    Reads no data: only the config and the existence (stat) of the files it names.
    """
    errors: list[str] = []
    values = _resolved(cfg, errors)
    if values:
        _check_keys(values, errors)
        if not errors:
            errors.extend(_cross_field_problems(values))
    if errors:
        shown = "; ".join(errors[:MAX_SHOWN_ERRORS])
        more = f" (and {len(errors) - MAX_SHOWN_ERRORS} more)" if len(errors) > MAX_SHOWN_ERRORS else ""
        raise LingmaoError(shown + more)


def _resolved(cfg: DictConfig, errors: list[str]) -> dict[str, Any]:
    """The config as plain data, each unresolvable or missing value reported under its full key."""
    out: dict[str, Any] = {}
    for name in cfg:
        name = str(name)
        try:
            node = cfg[name]
        except MissingMandatoryValue:
            errors.append(f"{name}: a value is required")
            continue
        except OmegaConfBaseException as exc:
            errors.append(f"{name}: {_first_line(exc)}")
            continue
        if isinstance(node, DictConfig):
            out[name] = {}
            for key in node:
                full = f"{name}.{key}"
                try:
                    value = node[key]
                    out[name][str(key)] = OmegaConf.to_container(value, resolve=True) if isinstance(
                        value, (DictConfig, ListConfig)) else value
                except MissingMandatoryValue:
                    hint = f" (e.g. {full}=path/to/file.jsonl)" if key.endswith("_file") else ""
                    errors.append(f"{full}: a value is required{hint}")
                except OmegaConfBaseException as exc:
                    errors.append(f"{full}: {_first_line(exc)}")
        else:
            out[name] = OmegaConf.to_container(node, resolve=True) if isinstance(node, ListConfig) else node
    return out


def _check_keys(values: dict[str, Any], errors: list[str]) -> None:
    top = allowed_keys("")
    for name, value in values.items():
        if name not in top:
            errors.append(unknown_key_message(name))
            continue
        if isinstance(value, dict):
            allowed = allowed_keys(name)
            for key, item in value.items():
                full = f"{name}.{key}"
                if name == "trainer" and key in TRAINER_SET_ELSEWHERE:
                    errors.append(f"{full}: set by {TRAINER_SET_ELSEWHERE[key]}, not under trainer")
                elif key not in allowed:
                    errors.append(unknown_key_message(full))
                elif allowed[key] is not None:
                    _check_value(full, item, allowed[key], errors)
                elif isinstance(item, dict) and allowed_keys(full):
                    errors.extend(unknown_key_message(f"{full}.{k}") for k in item if k not in allowed_keys(full))
        elif top.get(name) is not None:
            _check_value(name, value, top[name], errors)
        elif name in SCHEMA or name in yaml_defaults():
            errors.append(f"{name}: expected a group of keys, got {value!r}")


def _check_value(full_key: str, value: Any, key: Key, errors: list[str]) -> None:
    problem = key.problem(value)
    if problem:
        errors.append(f"{full_key}={_show(value)}: {problem}; allowed: {key.describe()}")


def _show(value: Any) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _cross_field_problems(v: dict[str, Any]) -> list[str]:
    """Rules that involve more than one key, and the files the config names."""
    out: list[str] = []
    model, data, optim = v.get("model", {}), v.get("data", {}), v.get("optim", {})
    hw, night, trainer = v.get("hardware", {}), v.get("night", {}), v.get("trainer", {})
    if model.get("d_model") and model.get("nhead") and model["d_model"] % model["nhead"]:
        out.append(
            f"model.d_model={model['d_model']} is not divisible by model.nhead={model['nhead']}; "
            f"allowed nhead: {', '.join(str(h) for h in range(1, model['d_model'] + 1) if model['d_model'] % h == 0)}"
            if model["d_model"] <= 4096 else
            f"model.d_model={model['d_model']} is not divisible by model.nhead={model['nhead']}"
        )
    if data.get("context_length") and model.get("max_len") and data["context_length"] > model["max_len"]:
        out.append(
            f"data.context_length={data['context_length']} exceeds the positional table model.max_len="
            f"{model['max_len']}; lower data.context_length or raise model.max_len"
        )
    betas = optim.get("betas")
    if betas is not None and (len(betas) != 2 or not all(_is_a(b, float) and 0 <= b < 1 for b in betas)):
        out.append(f"optim.betas={_show(betas)}: allowed: a list of two numbers in [0, 1), e.g. [0.9, 0.95]")
    out.extend(data_config.rule_problems(data))
    out.extend(_night_problems(night))
    interval = trainer.get("val_check_interval")
    if isinstance(interval, float) and interval > 1:
        out.append(f"trainer.val_check_interval={interval}: a fraction of an epoch is at most 1")
    if hw.get("accelerator"):
        try:
            resolve_accelerator(hw["accelerator"])
        except LingmaoError as exc:
            name, requested = hw.get("name"), hw["accelerator"]
            chosen = f"hardware={name} (hardware.accelerator={requested})" if name and name != requested else ""
            out.append(f"{chosen}: {str(exc).split(': ', 1)[-1]}" if chosen else str(exc))
    out.extend(_file_problems(v))
    return out


def _night_problems(night: dict[str, Any]) -> list[str]:
    from lingmao.night import parse_time

    out: list[str] = []
    for key in ("start", "end", "now"):
        values = night.get(key)
        for i, value in enumerate(values if key == "now" and isinstance(values, list) else [values]):
            try:
                parse_time(value, f"night.{key}" + (f"[{i}]" if isinstance(values, list) else ""))
            except LingmaoError as exc:
                out.append(str(exc))
    return out


def _file_problems(v: dict[str, Any]) -> list[str]:
    """Files the config names: they must exist as the right kind of thing. Nothing is opened for reading
    except the first bytes of resume_from."""
    data = v.get("data", {})
    out: list[str] = data_config.file_problems(data)  # the data package checks the files it will read
    resume = v.get("resume_from")
    if resume:
        problem = checkpoint_problem(Path(resume))
        if problem:
            out.append(f"resume_from: {problem}")
    save_dir = v.get("model_save_dir")
    if save_dir:
        keep = {f"paths.{k}": p for k, p in v.get("paths", {}).items() if isinstance(p, str)}
        for k in ("train_file", "val_file", "test_file", "tokenizer_path"):
            names = data.get(k) or []
            for i, name in enumerate([names] if isinstance(names, str) else names):
                keep[f"data.{k}" + (f"[{i}]" if not isinstance(names, str) else "")] = str(name)
        keep["the current directory"] = "."
        problem = export_dir_problem(Path(save_dir), keep)
        if problem:
            out.append(f"model_save_dir: {problem}")
    for key, name in v.get("paths", {}).items():
        if isinstance(name, str) and Path(name).exists() and not Path(name).is_dir():
            out.append(f"paths.{key}: {name} exists and is not a directory")
    return out


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be a checkpoint written by torch.save (a zip archive), or None."""
    if not path.exists():
        return f"{path}: checkpoint not found"
    if path.is_dir():
        return f"{path}: is a directory, expected a .ckpt file"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return f"{path}: not a checkpoint (not a torch.save archive; damaged or another kind of file)"
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return f"{path}: not a checkpoint (a zip archive without data.pkl)"
    return None


def export_dir_problem(path: Path, keep: dict[str, str] | None = None) -> str | None:
    """An export replaces `path` as a whole, so it must be new, empty or a previous export, and must not
    contain any of `keep` ({what: path}: the run's outputs, its data, the current directory)."""
    target = path.resolve()
    for what, other in (keep or {}).items():
        other_path = Path(other).resolve()
        if target == other_path or target in other_path.parents:
            return f"{path} holds {what} ({other}) and an export replaces the whole folder: choose a folder of its own"
    if not path.exists():
        return None
    if not path.is_dir():
        return f"{path} exists and is not a directory"
    if any(path.iterdir()) and not (path / "config.json").is_file():
        return f"{path} is a non-empty folder but not a lingmao export, and the export replaces it: choose a new folder"
    return None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# ----------------------------------------------------------------------------------------------
# Hydra's own composition errors -> one line, exit 2
# ----------------------------------------------------------------------------------------------
def describe_hydra_error(exc: BaseException) -> str | None:
    """One line for a Hydra composition error that is the user's, or None (not one of those)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if isinstance(exc, MissingConfigException):
        missing = exc.missing_cfg_file or ""
        group, _, option = missing.rpartition("/")
        if exc.options and group:
            close = difflib.get_close_matches(option, list(exc.options), n=1)
            hint = f" (did you mean {group}={close[0]}?)" if close else ""
            return f"{group}={option}: no such option{hint}; available: {', '.join(exc.options)}"
        return _one_line(exc)
    if isinstance(exc, ConfigCompositionException):
        cause = exc.__cause__
        full_key = getattr(cause, "full_key", None)
        if full_key and "not in struct" in str(cause):
            return unknown_key_message(str(full_key))
        return _one_line(exc)
    if isinstance(exc, OverrideParseException):
        detail = _one_line(exc).replace(f"Error parsing override '{exc.override}'; ", "")
        return f"override '{exc.override}' does not parse: {detail}"
    return None


def _one_line(exc: BaseException) -> str:
    parts = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if exc.__cause__ is not None:
        parts.append(_first_line(exc.__cause__))
    text = "; ".join(dict.fromkeys(p.rstrip(".") for p in parts if not p.startswith(("full_key:", "object_type="))))
    return text.replace("Config search path:", "").strip("; ")


def report_config_errors(app: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a `@hydra.main` app: a composition error of the user's prints `error: ...` and exits 2.

    Hydra reports these through `hydra._internal.utils.run_and_report` (exit 1, several lines); for
    the duration of the call it is wrapped so such errors are described first. Errors raised by the
    task itself pass through untouched, and with HYDRA_FULL_ERROR=1 Hydra's behaviour is unchanged.
    """

    @functools.wraps(app)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            from hydra._internal import utils as hydra_utils
        except ImportError:  # pragma: no cover - another Hydra layout: keep its own reporting
            return app(*args, **kwargs)
        original = getattr(hydra_utils, "run_and_report", None)
        if original is None or traceback_wanted():
            return app(*args, **kwargs)

        def run_and_report(func: Callable[[], Any]) -> Any:
            def guarded() -> Any:
                try:
                    return func()
                except Exception as exc:
                    message = describe_hydra_error(exc)
                    if message is None:
                        raise
                    print(f"error: {message}", file=sys.stderr)
                    sys.exit(LingmaoError.exit_code)

            return original(guarded)

        hydra_utils.run_and_report = run_and_report
        try:
            return app(*args, **kwargs)
        finally:
            hydra_utils.run_and_report = original

    return wrapper
