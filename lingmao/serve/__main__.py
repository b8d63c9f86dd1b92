"""`python -m lingmao.serve model_dir=DIR`: the page and JSON API of a trained model (docs/serve.md).

The model is loaded once; the server listens on `host:port` (127.0.0.1:8000: this machine only, unless host=
says otherwise). Needs the `serve` extra (FastAPI, uvicorn); without it the app says what to install, in one
line, and exits 2. Ctrl-C or SIGTERM stops it: the generations in flight are cancelled (each request gets what
was sampled, marked as stopped), one line says so, and the exit code is 0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
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


def make_server(app: Any, on_signal: Callable[[int], None]) -> Any:
    """A uvicorn server for `app` whose Ctrl-C / SIGTERM calls `on_signal(signal)` and then shuts down gracefully,
    without re-raising the signal afterwards as uvicorn does (the process would die by it, with a traceback)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                on_signal(sig)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            signals = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    # log_config=None: the app's logging (one format, stderr); uvicorn's own lines only from warnings up.
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    return Server(config)


def run(cfg: DictConfig) -> None:
    require_serve_extra()
    limits, site = limits_and_site(cfg)  # bad keys are reported before anything is loaded
    threads = decoding_threads(cfg.get("cpu_threads", 1))
    host = str(cfg.get("host") or "127.0.0.1")
    sock = bind(host, cfg.get("port", 8000))
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM while loading: as Ctrl-C
    try:
        serve(cfg, host, sock, limits, site, threads)
    except KeyboardInterrupt:
        log.info("stopped before serving")
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()


def limits_and_site(cfg: DictConfig) -> tuple[Any, Any]:
    from lingmao.serve.guards import Site
    from lingmao.serve.limits import Limits

    limits = Limits.from_mapping(OmegaConf.to_container(cfg.limits) if cfg.get("limits") else None)
    site = Site.from_config({key: OmegaConf.to_container(cfg[key]) if OmegaConf.is_config(cfg.get(key))
                             else cfg.get(key) for key in Site.KEYS})
    return limits, site


def decoding_threads(setting: Any) -> int:
    """`cpu_threads=`: torch's CPU threads for the server's decoding, a whole number >= 1 (it overrides
    OMP_NUM_THREADS).

    One by default: then a request's text for a seed is the same whatever else is decoded beside it (the decoding
    step's rows do not depend on each other); with more threads the BLAS may split a product's sums between them
    differently for different numbers of rows, and that no longer holds (docs/serve.md#threads)."""
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise LingmaoError(f"cpu_threads={setting}: not a number of threads (a whole number >= 1)")
    return setting


def serve(cfg: DictConfig, host: str, sock: socket.socket, limits: Any, site: Any, threads: int) -> None:
    import torch

    from lingmao.generate import load_for_inference

    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the decoding thread, started later, takes this count too
    try:
        serve_model(load_for_inference(cfg), cfg, host, sock, limits, site)
    finally:
        torch.set_num_threads(before)  # as it was for whoever called run() in this process (tests do)


def serve_model(lm: Any, cfg: DictConfig, host: str, sock: socket.socket, limits: Any, site: Any) -> None:
    import torch

    from lingmao.serve.app import create_app

    app = create_app(lm, limits, name=str(cfg.get("model_dir") or cfg.get("ckpt")), site=site, host=host)
    log.info("model on %s, %d parameters, %d CPU thread(s)", lm.device, sum(p.numel() for p in lm.model.parameters()),
             torch.get_num_threads())
    warm_verse_tables(lm.tokenizer)
    stopped: list[str] = []

    def on_signal(sig: int) -> None:
        name = signal.Signals(sig).name
        count = app.state.batcher.stop("the server is shutting down")
        stopped.append(f"{name}: stopped" + (f", {count} generation{'s' if count != 1 else ''} in flight "
                                             "cancelled" if count else ""))

    if is_loopback(host):
        log.info("serving on %s (this machine only; host=0.0.0.0 serves the network)", url_of(sock))
    else:
        log.warning("serving on %s: other machines can reach it, and it has no authentication", url_of(sock))
    make_server(app, on_signal).run(sockets=[sock])
    log.info(stopped[0] if stopped else "stopped")


if __name__ == "__main__":
    run_app(run, "serve")
