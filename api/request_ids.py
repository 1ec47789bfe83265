"""Request ids: every response carries `X-Request-ID`, every log line written while the
request is handled names it (tuneq.logs), and the audit trail records it.

A sane incoming `X-Request-ID` (a proxy's, a client's retry) is kept, so one id follows a
request through every hop; anything else (too long, characters a log line or a header
should not hold) is replaced by a new id. The middleware wraps the whole application,
outside Starlette's ServerErrorMiddleware, so a 500 carries the id too.
"""

from __future__ import annotations

import re

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuneq.ids import new_id
from tuneq.logs import current_request_id

HEADER = "X-Request-ID"
MAX_LENGTH = 64  # audit_records.request_id
_SANE = re.compile(rf"[A-Za-z0-9._:+=/-]{{1,{MAX_LENGTH}}}")
_HEADER = HEADER.lower().encode()


def accepted_or_new(incoming: bytes | None) -> str:
    """The incoming id if it is sane, else a new one."""
    if incoming is not None:
        text = incoming.decode("latin-1")
        if _SANE.fullmatch(text):
            return text
    return new_id("req")


class RequestIds:
    """Plain ASGI (as api.metrics' middleware, for the same reason: no extra task)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((value for name, value in scope["headers"] if name == _HEADER), None)
        request_id = accepted_or_new(incoming)
        scope.setdefault("state", {})["request_id"] = request_id  # request.state.request_id
        header = (_HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if h[0].lower() != _HEADER]
                message["headers"] = [*headers, header]
            await send(message)

        token = current_request_id.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)


def install(app: FastAPI) -> None:
    """Wrap the application's middleware stack, whatever is added to it, in `RequestIds`."""
    build = app.build_middleware_stack

    def build_with_request_ids() -> ASGIApp:
        return RequestIds(build())

    app.build_middleware_stack = build_with_request_ids  # type: ignore[method-assign]
