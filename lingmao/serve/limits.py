"""What one request may ask of the server (new tokens, wall time, prompt length, samples) and how much work it takes
on at once (generations decoded together, requests waiting for a place)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from lingmao.checks import check_fields, describe_field, number, show
from lingmao.errors import LingmaoError


@dataclass(frozen=True)
class Limits:
    KEY: ClassVar[str] = "limits"
    max_new_tokens: int = number(500, ge=1)  # free text; a form fixes its own length
    time_s: float = number(60.0, gt=0)  # wall time of one request, from its arrival (waiting included)
    max_prompt_chars: int = number(2000, ge=1)  # prompt and title, each
    max_samples: int = number(8, ge=1)
    max_concurrent: int = number(16, ge=1)  # generations decoded together, one model step for all
    max_queued: int = number(64, ge=0)  # requests waiting for a place beyond those; past it: 503

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def max_body_bytes(self) -> int:
        """A request body larger than this is refused unread: room for a prompt and a title of the longest
        allowed length (up to 4 bytes a character in UTF-8, 6 as a JSON escape) and the other options."""
        return 12 * self.max_prompt_chars + 16_384

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> Limits:
        """Limits from the `limits:` block of the config: unknown keys and wrong types are one-line errors."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        for key, value in dict(values or {}).items():
            if key not in fields:
                raise LingmaoError(f"limits.{key}: unknown key; limits keys: {', '.join(fields)}")
            kind = float if fields[key].type in (float, "float") else int
            if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
                raise LingmaoError(f"limits.{key}={show(value)}: wrong type; allowed: {describe_field(cls, key)}")
            out[key] = kind(value)
        return cls(**out)
