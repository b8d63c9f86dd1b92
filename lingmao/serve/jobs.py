"""One generation on a worker thread: its characters as events while they are sampled, a time limit, and a way
to stop it (the client went away, the server shuts down).

Concurrent jobs share the model but not their random state: `lingmao.sampling.sample_ids` draws from a
`torch.Generator` of its own, seeded per call, and uses no global random state; the form constraint's decoding
state belongs to the call too. So two requests with seeds get the same text whether they run together or one
after the other, and no lock is needed around generation. A job is stopped from inside the sampling loop: the
`on_token` hook raises, which ends the generation at that step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from lingmao.data import make_converter
from lingmao.serve.marks import poem_marks
from lingmao.verse.forms import normalize_form, normalize_rhyme

Event = dict[str, Any]


class Stopped(Exception):
    """Raised by the token hook to end a generation early (time limit, cancelled)."""


class Job:
    """`run()` (on a worker thread) generates with `options` and returns the result; `on_event` gets each
    `{"event": "token", "sample": i, "text": piece}` as it is sampled (from the worker thread)."""

    def __init__(
        self, lm: Any, options: dict[str, Any], time_s: float, on_event: Callable[[Event], None] | None = None
    ) -> None:
        self.lm, self.options, self.time_s, self.on_event = lm, options, time_s, on_event
        self.pieces: list[list[str]] = [[] for _ in range(options.get("num_samples", 1))]
        self.deadline = float("inf")
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def _on_token(self, sample: int, piece: str) -> None:
        if self._cancelled.is_set():
            raise Stopped("cancelled")
        self.pieces[sample].append(piece)
        if self.on_event is not None:
            self.on_event({"event": "token", "sample": sample, "text": piece})
        if time.monotonic() > self.deadline:
            raise Stopped(f"time limit: stopped after {self.time_s:g} s (limits.time_s)")

    def run(self) -> dict[str, Any]:
        """Generate; a user error in the options raises `LingmaoError` before any token is sampled."""
        started = time.monotonic()
        self.deadline = started + self.time_s
        opts = self.options
        stopped = None
        if self._cancelled.is_set():
            texts, stopped = ["" for _ in self.pieces], "cancelled"
        else:
            try:
                texts = self.lm.generate(**opts, on_token=self._on_token)
            except Stopped as exc:
                stopped = str(exc)
                texts = [self._prompt_seen() + "".join(p) for p in self.pieces]
        form = normalize_form(opts.get("form") or ("ci" if opts.get("tune") else None))
        rhyme_mode = normalize_rhyme(opts.get("rhyme"), form) if form else "pingshui"
        return {
            "seed": opts.get("seed"),
            "form": form,
            "tune": opts.get("tune"),
            "poems": [poem_marks(t, form, opts.get("tune"), rhyme_mode, opts.get("title")) for t in texts],
            "new_tokens": sum(len(p) for p in self.pieces),
            "seconds": round(time.monotonic() - started, 3),
            "stopped": stopped,
        }

    def _prompt_seen(self) -> str:
        """The prompt as the model continued it (after the model's data.convert), for a result cut short."""
        convert = ((self.lm.config or {}).get("data") or {}).get("convert") or "none"
        converter = make_converter(convert) or (lambda s: s)
        return converter(self.options.get("prompt") or "")
