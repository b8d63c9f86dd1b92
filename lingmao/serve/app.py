"""The FastAPI application: the page, `GET /api/info`, `POST /api/generate`, `POST /api/generate/stream`.

Every error is JSON `{"error": "one line"}` (docs/serve.md lists them): a request the model cannot serve as asked
(unknown form, an acrostic longer than the form, a temperature out of range, a limit exceeded) is a
`LingmaoError` -> 400; a request from another site or for another host -> 403; a body over the size limit -> 413,
refused before it is read whole; a body that is not `application/json` -> 415; one that is not valid JSON or does
not fit the schema (a lone surrogate or a control character in a text included) -> 422; no place for another
request -> 503 with Retry-After.

The generations of all requests are decoded together on one thread (`Batcher`); a request's time limit counts
from its arrival; a client that goes away (plain or streamed) cancels its generation. The stream is NDJSON, one
event a line: `start`, `token` (one character of one sample, as sampled), then `done` (the result of `POST
/api/generate`) or `error`. A stream's request is checked and admitted before its response begins, so a bad one
gets its 4xx like the plain endpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Receive, Scope, Send

from lingmao.decoding import Generation
from lingmao.errors import LingmaoError
from lingmao.serve.batcher import Batcher, Busy
from lingmao.serve.guards import BodyLimit, SameSite, Site, error, server_names
from lingmao.serve.jobs import Event, Job
from lingmao.serve.limits import Limits
from lingmao.serve.requests import GenerateRequest, generation_options
from lingmao.verse.forms import FORM_NAMES, FORMS

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
JSON_BODY = {"requestBody": {"required": False,
                             "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}}}}
GONE = "cancelled: the client went away"
MAX_AUTHORS_SHOWN = 2000  # the page's list of authors to choose from; any author of the model is accepted


class Refused(Exception):
    """A request refused with `status` and a one-line reason (and `headers`, such as Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def model_info(lm: Any, name: str) -> dict[str, Any]:
    config = lm.config or {}
    return {
        "name": name,
        "arch": (config.get("model") or {}).get("arch"),
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "vocab_size": lm.tokenizer.get_vocab_size(),
        "context_length": (config.get("data") or {}).get("context_length"),
        "device": str(lm.device),
        # data.condition: the header fields the page offers, and the authors (most poems first)
        "condition": (config.get("condition") or {}).get("fields") or [],
        "authors": list((config.get("condition") or {}).get("authors") or {})[:MAX_AUTHORS_SHOWN],
    }


def schema_message(errors: list[dict[str, Any]]) -> str:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
    return f"{where}: {first.get('msg')}"


async def read_request(request: Request) -> GenerateRequest:
    """The body as a `GenerateRequest`: 415 unless it is declared JSON, 422 unless it is valid JSON that fits."""
    declared = request.headers.get("content-type")
    if (declared or "").split(";")[0].strip().lower() != "application/json":
        shown = f"Content-Type {declared!r}" if declared else "no Content-Type"
        raise Refused(415, f"{shown}: the API takes JSON bodies (Content-Type: application/json)")
    body = await request.body()
    try:
        data = json.loads(body) if body.strip() else {}
    except RecursionError:
        raise Refused(422, "body: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError: not UTF-8
        raise Refused(422, f"body: not valid JSON ({exc})") from None
    try:
        return GenerateRequest.model_validate(data)
    except ValidationError as exc:
        raise Refused(422, schema_message(exc.errors(include_url=False))) from None


async def disconnected(request: Request) -> None:
    """Return when the client has gone away (the body has been read: only a disconnect can come now)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class StreamThenCancel(StreamingResponse):
    """A streamed response that calls `on_end` however it ends: done, the client gone, or the server stopping."""

    def __init__(self, content: AsyncIterator[str], on_end: Callable[[], None]) -> None:
        super().__init__(content, media_type="application/x-ndjson")
        self.on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end()


def create_app(lm: Any, limits: Limits | None = None, name: str = "", site: Site | None = None,
               host: str = "127.0.0.1") -> FastAPI:
    """The application serving `lm` (a `LingmaoModel`, loaded once) within `limits`, to pages of its own site
    (and `site.allow_origins`) at the addresses a server on `host` answers to (and `site.allowed_hosts`)."""
    from lingmao.verse.tunes import tunes

    limits, site = limits or Limits(), site or Site()
    window = ((lm.config or {}).get("data") or {}).get("context_length")
    batcher = Batcher(lm.model, window, limits.max_concurrent, limits.max_queued)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="lingmao", docs_url=None, redoc_url=None, lifespan=lifespan)  # the docs pages need a CDN
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if site.allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(site.allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["content-type"])
    app.add_middleware(SameSite, names=server_names(host, site.allowed_hosts), allow_origins=site.allow_origins)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    info = {
        "model": model_info(lm, name),
        "forms": [{"name": f, "label": FORM_NAMES[f], "chars": c, "lines": n} for f, (c, n) in FORMS.items()],
        "tunes": [{"name": t.name, "characters": t.characters, "shape": t.marked_shape()} for t in tunes()],
        "limits": {
            "max_new_tokens": limits.max_new_tokens, "time_s": limits.time_s,
            "max_prompt_chars": limits.max_prompt_chars, "max_samples": limits.max_samples,
        },
    }

    @app.exception_handler(LingmaoError)
    async def user_error(_: Request, exc: LingmaoError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(Refused)
    async def refused(_: Request, exc: Refused) -> JSONResponse:
        return error(exc.status, str(exc), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), exc.headers)

    async def admit(request: Request, on_event: Callable[[Event], None] | None = None) -> tuple[Job, Any]:
        """Read, check and queue a request: its job and the (asyncio) future of its generation."""
        arrival = time.monotonic()
        options = generation_options(await read_request(request), limits)
        job = await run_in_threadpool(Job, lm, options, limits.time_s, arrival, on_event)
        try:
            future = batcher.submit(job.generation)
        except Busy as exc:
            raise Refused(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        return job, asyncio.wrap_future(future)

    def failed(generation: Generation) -> str | None:
        exc = generation.error
        if exc is None:
            return None
        if isinstance(exc, LingmaoError):
            return str(exc).splitlines()[0]
        log.error("generation failed", exc_info=exc)
        return f"generation failed: {type(exc).__name__}"

    def logged(result: dict[str, Any]) -> dict[str, Any]:
        if not (result["stopped"] or "").startswith(("cancelled", "the server")):
            log.info("%s seed %s: %d samples, %d new tokens in %.2f s%s", result["form"] or "free text",
                     result["seed"], len(result["poems"]), result["new_tokens"], result["seconds"],
                     f" ({result['stopped']})" if result["stopped"] else "")
        return result

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info")
    async def get_info() -> dict[str, Any]:
        """The model, the forms and ci tunes it can write, and this server's limits."""
        return info

    @app.post("/api/generate", openapi_extra=JSON_BODY)
    async def generate(request: Request) -> Any:
        """Generate and return every sample with its tone and rhyme marks."""
        job, future = await admit(request)
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not future.done():
            job.generation.cancel(GONE)
            batcher.wake()
            return error(499, GONE)  # nobody reads it
        problem = failed(future.result())
        if problem is not None:
            return error(400 if isinstance(job.generation.error, LingmaoError) else 500, problem)
        return logged(await run_in_threadpool(job.result))

    @app.post("/api/generate/stream", openapi_extra=JSON_BODY)
    async def generate_stream(request: Request) -> Any:
        """The same as NDJSON events, each character as it is sampled."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        job, future = await admit(request, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        future.add_done_callback(lambda _: queue.put_nowait(None))  # after every token event (FIFO)

        async def events() -> AsyncIterator[str]:
            yield _line({"event": "start", "seed": job.options["seed"], "num_samples": job.generation.num_samples,
                         "prompt": job.options["prompt"]})
            while (event := await queue.get()) is not None:
                yield _line(event)
            problem = failed(future.result())
            if problem is not None:
                yield _line({"event": "error", "error": problem})
            else:
                yield _line({"event": "done", **logged(await run_in_threadpool(job.result))})

        def end() -> None:
            job.generation.cancel(GONE)  # no effect once it has ended
            batcher.wake()

        return StreamThenCancel(events(), end)

    return app


# Characters some readers take for line breaks (Python's str.splitlines), escaped so that one event is one line.
_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def _line(event: Event) -> str:
    return json.dumps(event, ensure_ascii=False).translate(_BREAKS) + "\n"
