"""One request's generation: its options checked and turned into a `lingmao.decoding.Generation` (which the
`Batcher` decodes beside the others), its characters as events while they are sampled, and its result with marks.

Each generation has its own random generator, seeded per request, and its own rules (the verse form's decoding
state among them); the decoding step is row-wise, so a request with a seed gets the same text alone or beside
others (`lingmao.decoding`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lingmao.sampling import prepare
from lingmao.serve.marks import poem_marks
from lingmao.verse.forms import normalize_form, normalize_rhyme

Event = dict[str, Any]

TIME_LIMIT = "time limit"  # the decoder's stop reason for a deadline


class Job:
    """A request's generation. `on_event` gets each `{"event": "token", "sample": i, "text": piece}` as it is
    sampled (from the decoding thread). The time limit counts from `arrival` (a `time.monotonic()` time)."""

    def __init__(self, lm: Any, options: dict[str, Any], time_s: float, arrival: float,
                 on_event: Callable[[Event], None] | None = None) -> None:
        self.options, self.time_s, self.arrival, self.on_event = options, time_s, arrival, on_event
        self.generation = prepare(lm, **options, on_token=self._on_token if on_event is not None else None)
        self.generation.deadline = arrival + time_s

    def _on_token(self, sample: int, piece: str) -> None:
        self.on_event({"event": "token", "sample": sample, "text": piece})

    def stopped(self) -> str | None:
        reason = self.generation.stop_reason
        if reason == TIME_LIMIT:
            return f"time limit: stopped after {self.time_s:g} s (limits.time_s)"
        return reason

    def result(self) -> dict[str, Any]:
        """The texts so far (all of them, for a generation that ran to its end) with their marks."""
        opts = self.options
        form = normalize_form(opts.get("form") or ("ci" if opts.get("tune") else None))
        rhyme_mode = normalize_rhyme(opts.get("rhyme"), form) if form else "pingshui"
        return {
            "seed": opts.get("seed"),
            "form": form,
            "tune": opts.get("tune"),
            "poems": [poem_marks(t, form, opts.get("tune"), rhyme_mode, opts.get("title"))
                      for t in self.generation.texts()],
            "new_tokens": sum(len(row) for row in self.generation.rows()),
            "seconds": round(time.monotonic() - self.arrival, 3),
            "stopped": self.stopped(),
        }
