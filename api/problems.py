"""Every error leaves as RFC 9457 problem+json: domain errors, validation errors, 404 routes."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, routing
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tuneq.errors import ErrorItem, TuneqError

PROBLEM_TYPE_BASE = "https://tuneq.dev/problems/"
MEDIA_TYPE = "application/problem+json"


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


def problem_from(exc: TuneqError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
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


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in {"body", "query", "path", "header"}:
        parts = parts[1:]
    return ".".join(parts)


async def _tuneq_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TuneqError)
    return problem_from(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    items = [
        ErrorItem(
            "unknown field" if e["type"] == "extra_forbidden" else e["msg"],
            field=_field_path(tuple(e["loc"])),
        )
        for e in exc.errors()
    ]
    first = items[0]
    return problem(
        422,
        "Invalid request",
        f"{first.field}: {first.message}" if first.field else first.message,
        code="invalid_request",
        errors=items,
        param=first.field or None,
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        # Starlette names the methods of the first route that matched the path; RFC 9110
        # wants every method the resource has, and each of ours is a route of its own.
        headers["Allow"] = ", ".join(sorted(_methods_for(request)))
    return problem(exc.status_code, title, str(exc.detail), code=code, headers=headers or None)


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


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    return problem(500, "Internal error", "an unexpected error occurred", code="internal_error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(TuneqError, _tuneq_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
