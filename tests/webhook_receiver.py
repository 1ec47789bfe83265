"""A webhook receiver for tests: a real HTTP server on loopback that answers with the
statuses it is given and keeps what it received, and the receiver's own signature check
(plain hmac, as the README shows it; not tuneq's signing code)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.stack import wait_for


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]  # lowercased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    url: str
    statuses: list[int]  # answers in order; 200 once they are spent
    received: list[Received] = field(default_factory=list)
    location: str | None = None  # a Location header on every answer (a redirect)

    def wait_for(self, count: int, timeout: float = 60) -> list[Received]:
        return wait_for(
            lambda: len(self.received) >= count and list(self.received),
            timeout=timeout,
            interval=0.1,
            what=f"{count} request(s) at {self.url}",
        )


@contextmanager
def receiver(
    *statuses: int, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
) -> Iterator[Receiver]:
    """A receiver at http(s)://<host>:<free port>/hook until the block ends."""
    server = ThreadingHTTPServer((host, 0), _Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    scheme = "https" if tls is not None else "http"
    state = Receiver(f"{scheme}://{host}:{server.server_address[1]}/hook", list(statuses))
    server.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        state: Receiver = self.server.state  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        headers = {name.lower(): value for name, value in self.headers.items()}
        state.received.append(Received(headers, body))
        status = state.statuses.pop(0) if state.statuses else 200
        self.send_response(status)
        if state.location is not None:
            self.send_header("location", state.location)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


def signature_is_valid(secret: str, request: Received) -> bool:
    """Standard Webhooks: HMAC-SHA256 of `{id}.{timestamp}.{body}` under the secret's bytes."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    headers = request.headers
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + request.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        version == "v1" and hmac.compare_digest(value, expected)
        for version, _, value in (s.partition(",") for s in headers["webhook-signature"].split())
    )
