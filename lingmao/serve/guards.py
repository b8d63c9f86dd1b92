"""What a request must be before the application reads it: addressed to this server (`Host`), sent by its own page
or a site it lists (`Origin`), and of a bounded size. Each is an ASGI middleware that answers a refusal itself, as
JSON `{"error": "one line"}`.

Why Host and Origin: a page on another site can make a browser send requests to this server (it listens on
127.0.0.1, which every browser on the machine can reach). A form post from such a page carries its `Origin`,
which is refused (403) unless `allow_origins` lists it. A page whose domain is made to resolve to 127.0.0.1 (DNS
rebinding) is same-origin to the browser, but its requests name that domain in `Host`, which is refused (403)
unless it is one this server answers to: an IP address (a rebinding needs a name), `localhost`, the host it was
started with, the machine's own names when it listens on every interface, or a name in `allowed_hosts`. Requests
without an `Origin` (curl, scripts) are not cross-site and pass.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lingmao.checks import show
from lingmao.errors import LingmaoError


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """`{"error": "the first line of message"}` with `status`; text no encoder accepts (a lone surrogate a
    request sent) is escaped, so that the refusal itself never fails."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = (lines[0] if lines else "error").encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": text}, status_code=status, headers=dict(headers or {}))


@dataclass(frozen=True)
class Site:
    """The serve app's cross-site keys (top level of conf/serve.yaml)."""

    KEYS: ClassVar[tuple[str, ...]] = ("allow_origins", "allowed_hosts")
    allow_origins: tuple[str, ...] = ()  # other sites whose pages may call the API (http://host:port; * = any)
    allowed_hosts: tuple[str, ...] = ()  # more names this server is reached by (* = any)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Site:
        out = {}
        for key in cls.KEYS:
            value = cfg.get(key) or []
            if isinstance(value, str) or not isinstance(value, Iterable) or not all(isinstance(x, str) for x in value):
                raise LingmaoError(f"{key}={show(value)}: wrong type; allowed: a list of strings")
            out[key] = tuple(value)
        for origin in out["allow_origins"]:
            if origin != "*" and origin_key(origin) is None:
                raise LingmaoError(f"allow_origins: '{origin}' is not an origin (scheme://host[:port], or *)")
        return cls(**out)


def origin_key(origin: str, default_scheme: str | None = None) -> tuple[str, str, int] | None:
    """(scheme, host, port) of 'http://host:port' (or of a bare 'host:port' with `default_scheme`), or None."""
    try:
        parts = urlsplit(origin if "://" in origin or default_scheme is None else f"{default_scheme}://{origin}")
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return None
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def server_names(host: str, allowed_hosts: Iterable[str] = ()) -> frozenset[str]:
    """The host names a server listening on `host` answers to, besides IP addresses and *.localhost."""
    names = {"localhost", *(h.lower() for h in allowed_hosts)}
    if not is_ip(host):
        names.add(host.lower())
    if host in ("0.0.0.0", "::", ""):  # every interface: the machine's own names too
        names.update(n.lower() for n in (socket.gethostname(), socket.getfqdn()) if n)
    return frozenset(names)


class SameSite:
    """Refuse (403) a request whose `Host` this server does not answer to, or whose `Origin` is another site's
    that `allow_origins` does not list (see the module docstring)."""

    def __init__(self, app: ASGIApp, names: frozenset[str], allow_origins: Iterable[str] = ()) -> None:
        self.app, self.names = app, names
        origins = tuple(allow_origins)
        self.any_origin = "*" in origins
        self.origins = {origin_key(o) for o in origins if o != "*"}

    def host_problem(self, host: str) -> str | None:
        parts = origin_key(host, "http")
        name = parts[1] if parts else ""
        if not name:
            return f"Host '{host}' is not a host name"
        if "*" in self.names or is_ip(name) or name in self.names or name.endswith(".localhost"):
            return None
        return f"Host '{host}' is not an address of this server (allowed_hosts lists more names it answers to)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        problem = self.host_problem(host) if host is not None else None
        origin = headers.get("origin")
        if problem is None and origin is not None and not self.any_origin:
            key = origin_key(origin)
            if key is None or (key != origin_key(host or "", scope.get("scheme", "http")) and key not in self.origins):
                problem = (f"Origin '{origin}' is another site (allow_origins lists the sites whose pages may use "
                           "this server)")
        if problem is not None:
            await error(403, problem)(scope, receive, send)
            return
        await self.app(scope, receive, send)


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
            return await receive()  # later calls wait for the client's disconnect, which cancels its generation

        await self.app(scope, replay, send)

