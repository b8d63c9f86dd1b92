"""The server's decoding thread: the generations of all requests in flight decoded together, with bounded work.

Requests are `submit`ted as `lingmao.decoding.Generation`s. Up to `limits.max_concurrent` of them are decoded
together by one `BatchDecoder` (one model step for all at each step); up to `limits.max_queued` more wait for a
place, in order of arrival; past that `submit` raises `Busy` (the app answers 503 with Retry-After). A generation
past its deadline (`limits.time_s` from its request's arrival) ends with what it has, whether it is decoding or
still waiting; `Generation.cancel` (the client went away) ends it at the next step; `stop` (the server shuts down)
ends them all. The result of `submit` is a future that completes with the generation when it has ended.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

from lingmao.decoding import BatchDecoder, Generation

log = logging.getLogger(__name__)


class Busy(Exception):
    """No place for another request now; `retry_after` seconds is a fair wait."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Batcher:
    def __init__(self, model: Any, capacity: int | None, max_concurrent: int, max_queued: int) -> None:
        self.model, self.capacity = model, capacity
        self.max_concurrent, self.max_queued = max_concurrent, max_queued
        self.decoder = BatchDecoder(model, capacity)
        self._pending: deque[tuple[Generation, Future]] = deque()
        self._futures: dict[int, Future] = {}
        self._decoding: set[int] = set()  # ids of the generations in the decoder
        self._durations: deque[float] = deque(maxlen=32)
        self._started: dict[int, float] = {}
        self._stopping: str | None = None
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="lingmao-decode", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return len(self._decoding)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one generation's time (the median of recent ones)."""
        return max(1, math.ceil(statistics.median(self._durations))) if self._durations else 1

    def submit(self, generation: Generation) -> Future:
        """Queue `generation`; the future completes with it once it has ended. `Busy` when there is no place."""
        future: Future = Future()
        with self._wake:
            if self._stopping is not None:
                raise Busy("the server is shutting down", 1)
            waiting = len(self._pending) + len(self._decoding) - self.max_concurrent
            if waiting >= self.max_queued:
                raise Busy(f"busy: {len(self._decoding)} generations running and {len(self._pending)} waiting "
                           f"(limits.max_concurrent, limits.max_queued); try again shortly", self.retry_after())
            self._started[id(generation)] = time.monotonic()
            self._pending.append((generation, future))
            self._wake.notify()
        return future

    def wake(self) -> None:
        """Look at the queue now (a waiting generation was cancelled)."""
        with self._wake:
            self._wake.notify()

    def stop(self, reason: str) -> int:
        """End every generation, running or waiting, with `reason`, and take no more; returns how many there were."""
        with self._wake:
            self._stopping = reason
            count = len(self._decoding) + len(self._pending)
            for g, _ in self._pending:
                g.cancel(reason)
            for g in list(self.decoder.generations):
                g.cancel(reason)
            self._wake.notify()
        return count

    def close(self, timeout: float = 10.0) -> None:
        """`stop` (if not yet) and wait for the thread to end."""
        self.stop(self._stopping or "the server is shutting down")
        self._thread.join(timeout)

    def _admit(self) -> list[Generation]:
        """Move waiting generations into the decoder while there is room; return those that ended while waiting."""
        ended = []
        now = time.monotonic()
        for g, _ in self._pending:
            if g.deadline is not None and now > g.deadline:
                g.cancel("time limit")
        kept: deque[tuple[Generation, Future]] = deque()
        for g, future in self._pending:
            if g.stop_reason is not None:
                g.done = True
                ended.append(g)
                self._futures[id(g)] = future
            elif len(self._decoding) < self.max_concurrent:
                self._futures[id(g)] = future
                try:
                    self.decoder.add(g)
                except Exception as exc:  # a generation the decoder cannot take (its window): it fails alone
                    g.error, g.done = exc, True
                if g.done:
                    ended.append(g)
                else:
                    self._decoding.add(id(g))
            else:
                kept.append((g, future))
        self._pending = kept
        return ended

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self.decoder.generations and self._stopping is None:
                    self._wake.wait()
                ended = self._admit()
                if self._stopping is not None and not self.decoder.generations and not self._pending:
                    self._finish(ended)
                    return
            if self.decoder.generations:
                try:
                    ended += self.decoder.step()
                except Exception as exc:  # the model itself failed: every generation in flight fails with it
                    log.error("decoding failed", exc_info=exc)
                    for g in self.decoder.generations:
                        g.error, g.done = exc, True
                    ended += self.decoder.generations
                    self.decoder = BatchDecoder(self.model, self.capacity)
                    self._decoding.clear()
            with self._wake:
                self._decoding.difference_update(id(g) for g in ended)
            self._finish(ended)

    def _finish(self, ended: list[Generation]) -> None:
        now = time.monotonic()
        for g in ended:
            future = self._futures.pop(id(g), None)
            started = self._started.pop(id(g), None)
            if started is not None and g.error is None and g.stop_reason is None:
                self._durations.append(now - started)
            if future is not None and not future.done():
                future.set_result(g)
