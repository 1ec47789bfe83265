"""Helpers for the event-stream tests: a `tuneq api` server on loopback, a plain reader of
Server-Sent Events (httpx and a parser written to the wire format, not the SDK), and a
job's events as the list route pages them."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.service_fixtures import auth
from tests.stack import Stack, wait_for

Frame = dict[str, str]  # one SSE block: field name -> value ("" is a comment line)
STREAM_TIMEOUT = httpx.Timeout(10.0, read=120.0)  # a stream is quiet between events


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@contextmanager
def api_server(stack: Stack, name: str = "api") -> Iterator[Server]:
    """`tuneq api` (uvicorn, the real app) on the stack's settings, on a free loopback port."""
    port = free_port()
    launcher = Stack(stack.name, stack.home, stack.overrides | {"port": port})
    process = launcher.start("api", log_name=f"{name}-{port}")
    server = Server(f"http://127.0.0.1:{port}", process, stack.home / f"{name}-{port}.log")
    try:
        wait_for(
            lambda: _healthy(server.url) or process.poll() is not None,
            timeout=120,
            what=f"tuneq api on {server.url}",
        )
        assert process.poll() is None, server.log.read_text()[-3000:]
        yield server
    finally:
        launcher.stop_all()


def parse_frame(block: str) -> Frame:
    """One SSE block, each line `name: value` (a comment: `: text`); a name appears once."""
    frame: Frame = {}
    for line in block.split("\n"):
        name, _, value = line.partition(":")
        assert name not in frame, f"field {name!r} twice in {block!r}"
        frame[name] = value.removeprefix(" ")
    return frame


def frames(chunks: Iterable[bytes]) -> Iterator[Frame]:
    """The frames of a stream as they arrive; the stream must not end inside a frame."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            yield parse_frame(block.decode())
    assert buffer == b"", f"the stream ended inside a frame: {buffer!r}"


def is_comment(frame: Frame) -> bool:
    return set(frame) == {""}


def carried(event: dict[str, Any]) -> dict[str, Any]:
    """How the stream must carry an event the list route shows (data decoded)."""
    return {"id": str(event["id"]), "event": event["type"], "data": event}


def decoded(frame: Frame) -> dict[str, Any]:
    """The frame with its data parsed as JSON, to compare with what the JSON routes answer."""
    return {**frame, "data": json.loads(frame["data"])} if "data" in frame else dict(frame)


def listed_events(client: httpx.Client, key: str, job_id: str) -> list[dict[str, Any]]:
    """All of a job's events from `GET /jobs/{id}/events`, paged to the end."""
    events: list[dict[str, Any]] = []
    after: int | None = None
    while True:
        params = {"limit": 100} | ({"after": after} if after is not None else {})
        response = client.get(f"/jobs/{job_id}/events", params=params, headers=auth(key))
        assert response.status_code == 200, response.text
        page = response.json()
        events += page["data"]
        if not page["has_more"]:
            return events
        after = page["data"][-1]["id"]
