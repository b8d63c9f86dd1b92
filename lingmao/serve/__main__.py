"""`python -m lingmao.serve model_dir=DIR`: the page and JSON API of a trained model (docs/serve.md).

The model is loaded once; the server listens on `host:port` (127.0.0.1:8000: this machine only, unless host=
says otherwise). Needs the `serve` extra (FastAPI, uvicorn); without it the app says what to install, in one
line, and exits 2.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lingmao.cli import run_app
from lingmao.errors import LingmaoError

log = logging.getLogger("lingmao.serve")

INSTALL = 'the web server needs FastAPI and uvicorn: pip install -e ".[serve]"'


def require_serve_extra() -> None:
    """A one-line LingmaoError naming the install command when FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise LingmaoError(f"{INSTALL} ({exc.name or 'a package'} is not installed)") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; a port in use or a host that does not resolve is a one-line error."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise LingmaoError(f"port={port}: not a port number (0-65535; 0 = any free port)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise LingmaoError(f"host={host} port={port}: cannot listen there ({exc.strerror or exc})") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def warm_verse_tables(tokenizer: Any) -> None:
    """Build the vocabulary's tone and rhyme tables now (seconds for a large vocabulary), not in the first
    request of each kind (`lingmao.verse.vocab` keeps them for the life of the process)."""
    from lingmao.verse.vocab import rhyme_masks, vocab_tables

    started = time.perf_counter()
    vocab_tables(tokenizer)
    for system in ("pingshui", "cilin", "modern"):
        rhyme_masks(tokenizer, system)
    log.info("tone and rhyme tables of the vocabulary ready (%.1f s)", time.perf_counter() - started)


def run(cfg: DictConfig) -> None:
    require_serve_extra()
    import uvicorn

    from lingmao.generate import load_for_inference
    from lingmao.serve.app import create_app
    from lingmao.serve.limits import Limits

    limits = Limits.from_mapping(OmegaConf.to_container(cfg.limits) if cfg.get("limits") else None)
    host = str(cfg.get("host") or "127.0.0.1")
    sock = bind(host, cfg.get("port", 8000))
    try:
        lm = load_for_inference(cfg)
        app = create_app(lm, limits, name=str(cfg.get("model_dir") or cfg.get("ckpt")))
        log.info("model on %s, %d parameters", lm.device, sum(p.numel() for p in lm.model.parameters()))
        warm_verse_tables(lm.tokenizer)
        if is_loopback(host):
            log.info("serving on %s (this machine only; host=0.0.0.0 serves the network)", url_of(sock))
        else:
            log.warning("serving on %s: other machines can reach it, and it has no authentication", url_of(sock))
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        sock.close()


if __name__ == "__main__":
    run_app(run, "serve")
