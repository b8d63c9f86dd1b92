"""What every lingmao app does with its command line: quote Chinese values, and report a bad config or a
bad override in one line with exit code 2 (`error: ...`), never a traceback."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf.errors import ValidationError

from lingmao.checks import describe_field, show
from lingmao.compat import hydra_error_reporter
from lingmao.errors import LingmaoError, traceback_wanted

# Trainer arguments that other keys set: naming them under trainer.* is refused with a pointer.
TRAINER_SET_ELSEWHERE = {
    "accelerator": "hardware.accelerator", "devices": "hardware.devices", "num_nodes": "hardware.num_nodes",
    "strategy": "hardware.strategy", "precision": "hardware.precision", "callbacks": "the callbacks group",
    "accumulate_grad_batches": "optim.accumulation_steps", "gradient_clip_val": "optim.max_grad_norm",
    "logger": "the logger group", "default_root_dir": "paths.runs_dir",
}


def quote_unicode_overrides(argv: list[str]) -> list[str]:
    """Quote `key=value` arguments whose value has non-ASCII characters (`prompt=床前明月光`), or the elements of
    such a list (`keywords=[月,霜]`).

    Hydra's override grammar rejects unquoted Chinese text, and the shell has already removed the
    quotes the user typed, so the app adds them back before Hydra parses the command line.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not arg.startswith("-") and value[:1] not in ("'", '"') and not value.isascii():
            if value[:1] == "[" and value[-1:] == "]":  # a list (keywords=[月,霜]): its elements are quoted
                if not set("'\"[]") & set(value[1:-1]):
                    items = [item.strip() for item in value[1:-1].split(",")]
                    value = "[" + ",".join(_quoted(i) if not i.isascii() else i for i in items) + "]"
            else:
                value = _quoted(value)
            arg = f"{key}={value}"
        out.append(arg)
    return out


def _quoted(value: str) -> str:
    # Inside Hydra quotes a backslash is literal unless it precedes a quote (or the closing one).
    value = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', value)
    return '"' + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value) + '"'


def schema_of(root: type | None, group: str) -> type | None:
    """The dataclass of a group under `root` ('' = root itself, 'hardware.ddp' = a nested one), or None."""
    schema: Any = root
    for part in [p for p in group.split(".") if p]:
        if not dataclasses.is_dataclass(schema):
            return None
        hint = typing.get_type_hints(schema).get(part)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        schema = args[0] if len(args) == 1 else hint
    return schema if dataclasses.is_dataclass(schema) else None


def unknown_key_message(full_key: str, root: type | None = None) -> str:
    """`optim.lr_rate: unknown key (did you mean optim.lr?); optim keys: ...`."""
    group, _, key = full_key.rpartition(".")
    if group == "trainer" and key in TRAINER_SET_ELSEWHERE:
        return f"{full_key}: set by {TRAINER_SET_ELSEWHERE[key]}, not under trainer"
    schema = schema_of(root, group)
    if schema is None:
        return f"{full_key}: unknown key"
    allowed = sorted(f.name for f in dataclasses.fields(schema))
    where = f"{group} keys" if group else "top-level keys"
    close = sorted((k for k in allowed if len(k) > 1 and (key.startswith(k) or k.startswith(key))), key=len)[-1:]
    close = close or difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {group + '.' if group else ''}{close[0]}?)" if close else ""
    return f"{full_key}: unknown key{hint}; {where}: {', '.join(allowed)}"


def describe_validation_error(exc: ValidationError, value: Any = None) -> str:
    """`optim.lr='fast': wrong type (str); allowed: a number > 0` for OmegaConf's type errors."""
    key, schema = str(exc.full_key or exc.key or ""), exc.object_type
    name = str(exc.key) if exc.key is not None else key.rpartition(".")[2]
    if value is None:
        match = re.search(r"Value '(.*?)'", str(exc))
        value = match.group(1) if match else None
    allowed = describe_field(schema, name) if dataclasses.is_dataclass(schema) else None
    shown = f"={show(value)}" if value is not None else ""
    kind = f" ({type(value).__name__})" if value is not None else ""
    return f"{key}{shown}: wrong type{kind}" + (f"; allowed: {allowed}" if allowed else "")


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def describe_hydra_error(exc: BaseException, root: type | None = None) -> str | None:
    """One line for a Hydra composition error that is the user's, or None (not one of those)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if isinstance(exc, MissingConfigException):
        missing = exc.missing_cfg_file or ""
        group, _, option = missing.rpartition("/")
        if exc.options and group:
            options = list(exc.options)
            close = difflib.get_close_matches(option, options, n=1)
            hint = f" (did you mean {group}={close[0]}?)" if close else ""
            return f"{group}={option}: no such option{hint}; available: {', '.join(options)}"
        return _one_line(exc)
    if isinstance(exc, ConfigCompositionException):
        cause = exc.__cause__
        full_key = getattr(cause, "full_key", None)
        if full_key and "not in" in str(cause):
            return unknown_key_message(str(full_key), root)
        if isinstance(cause, ValidationError):
            match = re.search(r"override (\S+?)=(.*)$", str(exc).splitlines()[0])
            return describe_validation_error(cause, match.group(2) if match else None)
        return _one_line(exc)
    if isinstance(exc, OverrideParseException):
        detail = _one_line(exc).replace(f"Error parsing override '{exc.override}'; ", "")
        return f"override '{exc.override}' does not parse: {detail}"
    return None


def _one_line(exc: BaseException) -> str:
    parts = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if exc.__cause__ is not None:
        parts.append(first_line(exc.__cause__))
    text = "; ".join(dict.fromkeys(p.rstrip(".") for p in parts if not p.startswith(("full_key:", "object_type="))))
    return text.replace("Config search path:", "").strip("; ")


def report_config_errors(root: type | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a `@hydra.main` app: a composition error of the user's prints `error: ...` and exits 2.

    Errors of the task itself pass through untouched, and with HYDRA_FULL_ERROR=1 Hydra's behaviour is
    unchanged (how: `lingmao.compat.hydra_error_reporter`). `root`: the app's config dataclass, for naming the
    allowed keys.
    """

    def decorate(app: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(app)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if traceback_wanted():
                return app(*args, **kwargs)
            with hydra_error_reporter(lambda exc: describe_hydra_error(exc, root), LingmaoError.exit_code):
                return app(*args, **kwargs)

        return wrapper

    return decorate


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # the apps' configs


def run_app(run: Callable[[Any], Any], config_name: str) -> None:
    """`python -m lingmao.<app>`: compose conf/<config_name>.yaml from the command line (Chinese overrides quoted),
    then `run(cfg)`; a mistake of the user's is one `error:` line and exit 2 (`debug=true`: the traceback)."""
    import logging

    import hydra

    from lingmao.errors import exit_on_user_error

    @report_config_errors()
    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def main(cfg: Any) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr, force=True)
        with exit_on_user_error(bool(cfg.get("debug"))):
            run(cfg)

    sys.argv[1:] = quote_unicode_overrides(sys.argv[1:])
    main()
