"""Declared ranges and choices for config dataclass fields, checked in one place.

A config dataclass declares what a field accepts next to its default::

    @dataclass
    class OptimConfig:
        KEY: ClassVar[str] = "optim"
        lr: float = number(1.0e-3, gt=0)
        on_bad_line: str = choice("error", "error", "skip")

        def __post_init__(self) -> None:
            check_fields(self)          # ranges and choices of every field, messages naming `optim.<field>`
            ...                         # then the rules that involve several fields

The same declarations describe a field in words ("a number > 0", "one of error, skip") for the messages
about values of the wrong type, which OmegaConf reports before `__post_init__` ever runs. Plain Python: the
model and optimizer files use it without Lightning or Hydra.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from lingmao.errors import LingmaoError

_META = "lingmao"


@dataclasses.dataclass(frozen=True)
class Allowed:
    """What a field accepts beyond its type: a range (bounds open or closed) or a fixed set of choices."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[Any, ...] = ()

    def problem(self, value: Any) -> bool:
        if value is None or isinstance(value, bool):
            return False
        if self.choices:
            return value not in self.choices
        if not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
            return False
        return (
            (self.gt is not None and value <= self.gt)
            or (self.ge is not None and value < self.ge)
            or (self.lt is not None and value >= self.lt)
            or (self.le is not None and value > self.le)
        )

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        low = f"({_num(self.gt)}" if self.gt is not None else f"[{_num(self.ge)}" if self.ge is not None else None
        high = f"{_num(self.lt)})" if self.lt is not None else f"{_num(self.le)}]" if self.le is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>' if low[0] == '(' else '>='} {low[1:]}"
        if high:
            return f"{'<' if high[-1] == ')' else '<='} {high[:-1]}"
        return ""


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


def number(default: Any, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None) -> Any:
    """A numeric field with a range (bounds: gt/ge below, lt/le above)."""
    return dataclasses.field(default=default, metadata={_META: Allowed(gt=gt, ge=ge, lt=lt, le=le)})


def choice(default: Any, *choices: Any) -> Any:
    """A field that takes one of `choices`."""
    return dataclasses.field(default=default, metadata={_META: Allowed(choices=tuple(choices))})


def allowed(cls: type, name: str) -> Allowed | None:
    """The declared range or choices of field `name` of dataclass `cls`, if any."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get(_META)
    return None


def describe_field(cls: type, name: str) -> str:
    """What field `name` accepts, in words: 'a number > 0', 'an integer >= 1', 'one of error, skip', ..."""
    hints = typing.get_type_hints(cls)
    hint = hints.get(name)
    rule = allowed(cls, name)
    if rule is not None and rule.choices:
        text = rule.describe()
    else:
        text = _type_words(hint)
        if rule is not None and rule.describe():
            text = f"{text} {rule.describe()}"
    if _optional(hint):
        text = f"null or {text}"
    return text


def _optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _type_words(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if _optional(hint) and len(args) == 1 else hint
    origin = typing.get_origin(base)
    if origin in (list, tuple) or base in (list, tuple):
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base, "a value")


def config_key(obj: Any, name: str) -> str:
    """'optim.lr' for field `lr` of an object whose class declares KEY = 'optim'."""
    prefix = getattr(obj, "KEY", "")
    return f"{prefix}.{name}" if prefix else name


def show(value: Any) -> str:
    """A value as a user typed it on the command line: null, true, 'text', 0.1."""
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(obj: Any) -> None:
    """Raise a one-line LingmaoError for the first field of dataclass `obj` outside its declared range/choices."""
    for f in dataclasses.fields(obj):
        rule = f.metadata.get(_META)
        value = getattr(obj, f.name)
        if rule is not None and rule.problem(value):
            what = "not allowed" if rule.choices else "out of range"
            raise LingmaoError(
                f"{config_key(obj, f.name)}={show(value)}: {what}; allowed: {describe_field(type(obj), f.name)}"
            )
