"""Byte caps on request bodies (api/limits.py): a body over `max_body_bytes` is refused with
413 before it is read whole, by the real app in-process and behind uvicorn; a body at the
cap reaches its route; uploads keep their own cap."""

from __future__ import annotations

import json
import select
import socket
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
import httpx
import pytest

from tests.api_helpers import TRAIN_ROWS, assert_problem, job_spec, jsonl, upload
from tests.client_servers import serve_app
from tests.service_fixtures import (
    api_client,
    asgi_client,
    auth,
    make_settings,
    migrate,
    new_team_key,
)
from tuneq.settings import Settings

CAP = 64 * 1024
UPLOAD_CAP = 8 * CAP  # max_upload_bytes: uploads have their own, larger cap
PIECE = 4096
ENDLESS = 64 * 1024 * 1024  # what a body "over the cap" would send if the server read it all


@dataclass
class Capped:
    settings: Settings
    key: str
    training_file: str


@pytest.fixture(scope="module")
def capped(tmp_path_factory, tiny_registry_file) -> Capped:
    home = tmp_path_factory.mktemp("body-limits")
    settings = make_settings(
        home,
        max_body_bytes=CAP,
        max_upload_bytes=UPLOAD_CAP,
        model_registry=str(tiny_registry_file),
    )
    migrate(settings)
    key = new_team_key(settings, "capped")
    with api_client(settings) as client:
        training_file = upload(client, key, TRAIN_ROWS)
    return Capped(settings, key, training_file)


def _spec_of_size(capped: Capped, size: int) -> bytes:
    """A valid job spec, padded with whitespace (still JSON) to `size` bytes."""
    spec = json.dumps(job_spec(capped.training_file)).encode()
    assert len(spec) <= size
    return spec + b" " * (size - len(spec))


class CountedBody:
    """A chunked body of ENDLESS bytes, made as it is read; counts the pieces taken."""

    def __init__(self) -> None:
        self.taken = 0

    def __iter__(self) -> Iterator[bytes]:
        for _ in range(ENDLESS // PIECE):
            self.taken += 1
            yield b" " * PIECE

    async def streamed(self) -> AsyncIterator[bytes]:
        for piece in self:
            yield piece


def _json_headers(key: str) -> dict[str, str]:
    return auth(key) | {"Content-Type": "application/json"}


def test_a_chunked_body_is_not_read_past_the_cap(capped):
    body = CountedBody()

    async def send() -> httpx.Response:
        # httpx's ASGI transport takes one piece from the body per receive() of the app
        async with asgi_client(capped.settings) as client:
            return await client.post(
                "/jobs", content=body.streamed(), headers=_json_headers(capped.key)
            )

    response = anyio.run(send)

    problem = assert_problem(response, 413)
    assert problem["code"] == "payload_too_large" and problem["param"] == "body"
    assert problem["limit_bytes"] == CAP and response.headers["connection"] == "close"
    assert body.taken == CAP // PIECE + 1  # the cap's worth, and the piece that passed it


def test_a_body_at_the_cap_reaches_its_route_whole(capped):
    spec = _spec_of_size(capped, CAP)
    with api_client(capped.settings) as client:
        created = client.post("/jobs", content=spec, headers=_json_headers(capped.key))
        over = client.post("/jobs", content=spec + b" ", headers=_json_headers(capped.key))
    assert created.status_code == 201, created.text
    assert assert_problem(over, 413)["code"] == "payload_too_large"

    async def send_chunked() -> httpx.Response:
        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, CAP, PIECE):
                yield spec[start : start + PIECE]

        async with asgi_client(capped.settings) as client:
            return await client.post("/jobs", content=pieces(), headers=_json_headers(capped.key))

    chunked = anyio.run(send_chunked)
    assert chunked.status_code == 201, chunked.text
    assert chunked.json()["training_file"] == capped.training_file


def test_uploads_keep_their_own_cap_and_only_they_do(capped):
    big = jsonl(TRAIN_ROWS * 200)
    assert len(big) > 2 * CAP
    with api_client(capped.settings) as client:
        uploaded = client.post("/files", headers=auth(capped.key), files={"file": ("b.jsonl", big)})
        # the same multipart body to a route that is not an upload's: the cap holds
        elsewhere = client.post("/jobs", headers=auth(capped.key), files={"file": ("b.jsonl", big)})
        facade = client.post(
            "/openai/v1/fine_tuning/jobs",
            content=_spec_of_size(capped, CAP + 1),
            headers=_json_headers(capped.key),
        )
    assert uploaded.status_code == 201, uploaded.text
    assert assert_problem(elsewhere, 413)["code"] == "payload_too_large"
    assert facade.status_code == 413 and facade.headers["content-type"] == "application/json"
    error = facade.json()["error"]
    assert error["code"] == "payload_too_large" and error["param"] == "body"


# ----------------------------------------------------------------------------- over uvicorn


@pytest.fixture(scope="module")
def server(capped) -> Iterator[tuple[str, int]]:
    with serve_app(capped.settings) as url:
        address = urlsplit(url)
        yield address.hostname or "127.0.0.1", address.port or 80


def _head(key: str, path: str, content_type: str, framing: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: tuneq\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: {content_type}\r\n{framing}\r\n\r\n"
    ).encode()


def _answer(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset after the
    answer, when it closed with our bytes unread, ends it too)."""
    answer = b""
    try:
        while piece := connection.recv(65536):
            answer += piece
    except ConnectionResetError:
        pass
    return answer


def _status_and_headers(answer: bytes) -> tuple[int, dict[str, str]]:
    head = answer.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in head[1:])
    return int(head[0].split(" ")[1]), {k.lower(): v for k, v in fields.items()}


def _send_chunked(server: tuple[str, int], head: bytes, body: Iterable[bytes]) -> tuple[int, bytes]:
    """Send `body` chunked until the server answers; the bytes sent, and the answer read
    until the server closes the connection."""
    sent = 0
    with socket.create_connection(server, timeout=30) as connection:
        connection.sendall(head)
        for piece in body:
            if select.select([connection], [], [], 0)[0]:
                break  # the server answered: no use sending the rest
            try:
                connection.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            except OSError:  # it closed the connection first
                break
            sent += len(piece)
        return sent, _answer(connection)


def test_uvicorn_refuses_a_content_length_over_the_cap_before_any_byte_is_sent(capped, server):
    head = _head(capped.key, "/jobs", "application/json", f"Content-Length: {CAP + 1}")
    with socket.create_connection(server, timeout=30) as connection:
        connection.sendall(head)
        answer = _answer(connection)  # not one byte of the body sent: refused on the header

    status, headers = _status_and_headers(answer)
    assert status == 413 and headers["connection"] == "close"
    assert b'"code":"payload_too_large"' in answer


def test_uvicorn_stops_reading_a_chunked_body_at_the_cap(capped, server):
    body = CountedBody()
    head = _head(capped.key, "/jobs", "application/json", "Transfer-Encoding: chunked")
    sent, answer = _send_chunked(server, head, body)

    status, headers = _status_and_headers(answer)
    assert status == 413 and headers["connection"] == "close"  # and closed: no more is read
    assert CAP < sent < ENDLESS and body.taken < ENDLESS // PIECE


def test_uvicorn_stops_reading_an_upload_over_its_own_cap(capped, server):
    boundary = "tuneq-boundary"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"'
    lines = b'{"text": "hello"}\n' * (PIECE // 18)

    def upload() -> Iterator[bytes]:
        yield f"{part}\r\n\r\n".encode()
        for _ in range(ENDLESS // len(lines)):
            yield lines

    content_type = f"multipart/form-data; boundary={boundary}"
    head = _head(capped.key, "/files", content_type, "Transfer-Encoding: chunked")
    sent, answer = _send_chunked(server, head, upload())

    status, headers = _status_and_headers(answer)
    assert status == 413 and headers["connection"] == "close"
    assert b'"param":"file"' in answer and UPLOAD_CAP < sent < ENDLESS
