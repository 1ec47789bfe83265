"""Every error leaves as RFC 9457 problem+json: domain errors, validation errors, 404 routes.

The handlers turn each kind of exception into a TuneqError, then render it in the style of
the road it came in by: problem+json, or the style a road under a path prefix registered
(`add_style`: the OpenAI-compatible facade renders OpenAI's error object). Each style is
rendered in one place; the native routes' answers do not depend on the other styles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg
from fastapi import FastAPI, Request, routing
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tuneq.errors import ErrorItem, InvalidRequest, TuneqError

PROBLEM_TYPE_BASE = "https://tuneq.dev/problems/"
MEDIA_TYPE = "application/problem+json"

# Renders a domain error, with the headers it needs, as one road's clients expect it.
ErrorStyle = Callable[[TuneqError, dict[str, str] | None], Response]


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    code: str,
    errors: list[ErrorItem] | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors:
        body["errors"] = [e.as_dict() for e in errors]
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def problem_from(exc: TuneqError, headers: dict[str, str] | None = None) -> JSONResponse:
    return problem(
        exc.status,
        exc.title,
        exc.detail,
        code=exc.code,
        errors=exc.errors,
        headers=headers,
        param=exc.param,
        **exc.extra,
    )


def add_style(app: FastAPI, prefix: str, style: ErrorStyle) -> None:
    """Render the errors of requests under `prefix` (a path such as "/openai/v1") with
    `style` instead of problem+json."""
    app.state.error_styles = (*getattr(app.state, "error_styles", ()), (prefix, style))


def render(request: Request, exc: TuneqError, headers: dict[str, str] | None = None) -> Response:
    """The error in its road's style; also for the middlewares that refuse a request before
    any route sees it (api/ratelimit.py, api/limits.py)."""
    if exc.status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    elif exc.status == 413:  # the rest of the body is unread: the server must not read it on
        headers = {**(headers or {}), "Connection": "close"}
    path = request.scope["path"].removeprefix(request.scope.get("root_path", ""))
    for prefix, style in getattr(request.app.state, "error_styles", ()):
        if path == prefix or path.startswith(prefix + "/"):
            return style(exc, headers)
    return problem_from(exc, headers)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in {"body", "query", "path", "header"}:
        parts = parts[1:]
    return ".".join(parts)


async def _tuneq_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TuneqError)
    return render(request, exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    items = [
        ErrorItem(
            "unknown field" if e["type"] == "extra_forbidden" else e["msg"],
            field=_field_path(tuple(e["loc"])),
        )
        for e in exc.errors()
    ]
    first = items[0]
    detail = f"{first.field}: {first.message}" if first.field else first.message
    return render(request, InvalidRequest(detail, errors=items, param=first.field or None))


class _HttpError(TuneqError):
    """An error Starlette raised (no route, wrong method), as a domain error to render."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        self.title = {404: "Not found", 405: "Method not allowed"}.get(status, "HTTP error")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        # Starlette names the methods of the first route that matched the path; RFC 9110
        # wants every method the resource has, and each of ours is a route of its own.
        headers["Allow"] = ", ".join(sorted(_methods_for(request)))
    return render(request, _HttpError(exc.status_code, str(exc.detail)), headers or None)


def _methods_for(request: Request) -> set[str]:
    routes: Any = request.app.routes
    if hasattr(routing, "iter_route_contexts"):  # FastAPI includes routers lazily
        routes = (context.route for context in routing.iter_route_contexts(routes))
    methods: set[str] = set()
    for route in routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return methods


async def _unstorable(request: Request, exc: Exception) -> Response:
    """A value the database refuses to hold or compare (PostgreSQL: a NUL character in a
    string, in a path, a query or a body) is the request's fault, not a server error; its
    transaction is rolled back with the request's, so nothing is half-written."""
    assert isinstance(exc, DataError | psycopg.DataError | asyncpg.DataError)
    cause = str(getattr(exc, "orig", None) or "").strip().splitlines()[:1]
    detail = "the request holds a value the database cannot store or compare"
    return render(request, InvalidRequest(f"{detail}: {cause[0]}" if cause else detail))


async def _unexpected(request: Request, exc: Exception) -> Response:
    return render(request, TuneqError("an unexpected error occurred"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(TuneqError, _tuneq_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DataError, _unstorable)
    app.add_exception_handler(psycopg.DataError, _unstorable)
    app.add_exception_handler(asyncpg.DataError, _unstorable)  # the job reads' own driver
    app.add_exception_handler(Exception, _unexpected)
