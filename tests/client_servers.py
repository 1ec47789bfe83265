"""HTTP servers on loopback for the SDK's tests: the real app under uvicorn, and small test
peers (a server that answers from a script, a proxy that loses an answer) for what the real
app cannot be made to do on demand (fail with 503, redirect elsewhere, drop a stream)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.service_fixtures import make_settings, migrate, new_team_key
from tuneq.settings import Settings


@contextmanager
def serve_app(settings: Settings) -> Iterator[str]:
    """The real API, served over HTTP by uvicorn in a thread; yields its URL."""
    import uvicorn

    from api.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(settings), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def sdk_deployment(home: Path, registry: Path, *teams: str) -> Iterator[tuple[str, list[str]]]:
    """A migrated SQLite deployment under `home`, its API served over HTTP: (URL, a key for
    each team named)."""
    settings = make_settings(home, model_registry=str(registry))
    migrate(settings)
    keys = [new_team_key(settings, team) for team in teams]
    with serve_app(settings) as url:
        yield url, keys


@dataclass
class Seen:
    """A request as the peer received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Reply = Callable[[BaseHTTPRequestHandler, Seen], None]


@dataclass
class Peer:
    """A loopback HTTP server that answers each request with `reply` and records it."""

    reply: Reply
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    @contextmanager
    def running(self) -> Iterator[Peer]:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                seen = Seen(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                peer.seen.append(seen)
                peer.reply(self, seen)

            do_GET = do_POST = do_DELETE = _handle

            def log_message(self, *_: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()


def send(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    *,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)
