"""A byte cap on every request body but an upload's, refused before the body is read whole.

FastAPI reads a route's body into memory before the route runs: without a cap, one request
with a body of gigabytes holds gigabytes. Here a body over `max_body_bytes` is refused with
413 in the road's style: at once when its Content-Length says so (not a byte of it read),
and when it comes chunked, as soon as the bytes read pass the cap; what was read (at most
the cap and one piece) is handed to the app when the body ends under it. The 413 closes
the connection, so that the server reads no more of a body nobody wants.

Uploads (`POST /files` and the facade's) stream their multipart body under their own,
larger cap (`max_upload_bytes`, api/uploads.py), so they pass through untouched.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import problems
from api.openai.routes import PREFIX as OPENAI_PREFIX
from api.routes.files import router as files_router
from tuneq.errors import PayloadTooLarge
from tuneq.settings import Settings

UPLOAD_ROUTES = frozenset({("POST", files_router.prefix), ("POST", f"{OPENAI_PREFIX}/files")})


class CapBodies:
    """ASGI middleware: bodies over `max_bytes` get 413 before they are read whole."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        length, chunked = _framing(scope)
        if (scope["method"], path) in UPLOAD_ROUTES or not (length or chunked):
            await self.app(scope, receive, send)
        elif length is not None and length > self.max_bytes:
            await self._refuse(scope, receive, send, f"the request body ({length} bytes)")
        elif length is not None:  # the server hands the app no more than Content-Length
            await self.app(scope, receive, send)
        else:
            await self._read_then_call(scope, receive, send)

    async def _read_then_call(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A chunked body: read up to the cap, then the app, or 413 past it."""
        try:
            body = await _read_at_most(receive, self.max_bytes)
        except ClientDisconnect:
            return  # nobody to answer
        if body is None:
            await self._refuse(scope, receive, send, "the request body")
        else:
            await self.app(scope, _replay(body, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        refused = PayloadTooLarge(
            f"{what} is larger than the limit of {self.max_bytes} bytes",
            param="body",
            extra={"limit_bytes": self.max_bytes},
        )
        response = problems.render(Request(scope), refused)  # which closes the connection
        await response(scope, receive, send)


def _framing(scope: Scope) -> tuple[int | None, bool]:
    """The body's declared length (None when not declared), and whether it is chunked."""
    length, chunked = None, False
    for name, value in scope["headers"]:
        if name == b"content-length" and value.strip().isdigit():
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return length, chunked


async def _read_at_most(receive: Receive, max_bytes: int) -> bytes | None:
    """The body, or None as soon as it passes `max_bytes` (the rest is never read);
    ClientDisconnect when the client leaves before its end."""
    pieces: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect
        piece = message.get("body", b"")
        size += len(piece)
        if size > max_bytes:
            return None
        pieces.append(piece)
        if not message.get("more_body", False):
            break
    return b"".join(pieces)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app: the body read ahead in one piece, then the server's own."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def install(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(CapBodies, max_bytes=settings.max_body_bytes)
