"""The FastAPI application: the page, `GET /api/info`, `POST /api/generate`, `POST /api/generate/stream`.

Errors are JSON `{"error": "one line"}`: a request the model cannot serve as asked (unknown form, an acrostic
longer than the form or with characters the vocabulary lacks, a limit exceeded, a bad temperature) is a
`LingmaoError` -> 400; a body that does not fit the schema -> 422; a body over the size limit -> 413, refused
before it is read whole. The stream is NDJSON, one event a line: `start`, `token` (one character of one sample,
as sampled), then `done` (the result of `POST /api/generate`) or `error`. A stream's request is checked before
its response begins, so a bad one gets its 4xx like the plain endpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lingmao.errors import LingmaoError
from lingmao.serve.jobs import Event, Job
from lingmao.serve.limits import Limits
from lingmao.serve.requests import GenerateRequest, generation_options
from lingmao.verse.forms import FORM_NAMES, FORMS

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_AUTHORS_SHOWN = 2000  # the page's list of authors to choose from; any author of the model is accepted


def error(status: int, message: str) -> JSONResponse:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return JSONResponse({"error": lines[0] if lines else "error"}, status_code=status)


class BodyLimit:
    """Refuse (413) a request body over `max_bytes`, by its Content-Length or while it arrives, before the
    application parses it; a body within the limit is passed on whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        refusal = error(413, f"request body over {self.max_bytes} bytes (limits.max_prompt_chars)")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await refusal(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await refusal(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the client's disconnect, as the stream needs

        await self.app(scope, replay, send)


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


def create_app(lm: Any, limits: Limits | None = None, name: str = "") -> FastAPI:
    """The application serving `lm` (a `LingmaoModel`, loaded once) within `limits`."""
    from lingmao.verse.tunes import tunes

    limits = limits or Limits()
    executor = ThreadPoolExecutor(max_workers=limits.max_concurrent, thread_name_prefix="lingmao-generate")
    running: set[Job] = set()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for job in list(running):
            job.cancel()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lingmao", docs_url=None, redoc_url=None, lifespan=lifespan)  # the docs pages need a CDN
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
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

    @app.exception_handler(RequestValidationError)
    async def schema_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error(422, f"body: not valid JSON ({(first.get('ctx') or {}).get('error', 'cannot parse')})")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return error(422, f"{where}: {first.get('msg')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    def start(request: GenerateRequest, on_event: Callable[[Event], None] | None = None) -> tuple[Job, Awaitable]:
        job = Job(lm, generation_options(request, limits), limits.time_s, on_event)
        running.add(job)
        future = asyncio.get_running_loop().run_in_executor(executor, job.run)
        future.add_done_callback(lambda _: running.discard(job))
        return job, future

    def logged(result: dict[str, Any]) -> dict[str, Any]:
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

    @app.post("/api/generate")
    async def generate(request: GenerateRequest) -> dict[str, Any]:
        """Generate and return every sample with its tone and rhyme marks."""
        _, future = start(request)
        return logged(await future)

    @app.post("/api/generate/stream")
    async def generate_stream(request: GenerateRequest) -> Any:
        """The same as NDJSON events, each character as it is sampled."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        job, future = start(request, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))

        def finished(fut: asyncio.Future) -> None:
            exc = fut.exception() if not fut.cancelled() else None
            if fut.cancelled():
                queue.put_nowait({"event": "error", "error": "cancelled"})
            elif isinstance(exc, LingmaoError):
                queue.put_nowait({"event": "error", "error": str(exc).splitlines()[0], "user_error": True})
            elif exc is not None:
                log.error("generation failed", exc_info=exc)
                queue.put_nowait({"event": "error", "error": f"generation failed: {type(exc).__name__}"})
            else:
                queue.put_nowait({"event": "done", **logged(fut.result())})

        future.add_done_callback(finished)
        first = await queue.get()  # the options were checked once a token (or the end) arrives
        if first["event"] == "error" and first.get("user_error"):
            return error(400, first["error"])

        async def events() -> AsyncIterator[str]:
            try:
                yield _line({"event": "start", "seed": job.options["seed"], "num_samples": len(job.pieces),
                             "prompt": job.options["prompt"]})
                event = first
                while True:
                    event.pop("user_error", None)
                    yield _line(event)
                    if event["event"] in ("done", "error"):
                        return
                    event = await queue.get()
            finally:
                job.cancel()  # the client went away (or the stream ended): stop sampling

        return StreamingResponse(events(), media_type="application/x-ndjson")

    return app


def _line(event: Event) -> str:
    return json.dumps(event, ensure_ascii=False) + "\n"
