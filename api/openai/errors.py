"""Errors as OpenAI's clients expect them: `{"error": {"message", "type", "param", "code"}}`.

The facade's style for api/problems.py (registered for the facade's path prefix): the same
domain errors as the native routes, with the HTTP status and `type` by which the `openai`
client picks its exception class. tuneq's 422 (a request that cannot be honoured: a bad
file, an invalid spec) is OpenAI's 400, BadRequestError. A file's line-numbered problems go
into the message, since that is what a client shows; they are also kept whole in `errors`.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from tuneq.errors import TuneqError

# tuneq's status -> the facade's: OpenAI answers a request it cannot honour with 400.
_STATUS = {422: 400}
# The error `type` OpenAI gives each status; anything else is invalid_request_error.
_TYPE = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
_LINES_IN_MESSAGE = 5  # the first problems named in the message; `errors` holds them all


def openai_error(exc: TuneqError, headers: dict[str, str] | None = None) -> JSONResponse:
    status = _STATUS.get(exc.status, exc.status)
    error: dict[str, Any] = {
        "message": _message(exc),
        "type": _TYPE.get(status, "invalid_request_error"),
        "param": exc.param,
        "code": exc.code,
    }
    if exc.errors:
        error["errors"] = [item.as_dict() for item in exc.errors]
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _message(exc: TuneqError) -> str:
    """The detail, followed by the lines at fault ("line 3: not valid JSON; ...")."""
    lines = [f"line {e.line}: {e.message}" for e in exc.errors if e.line is not None]
    if not lines:
        return exc.detail
    shown = "; ".join(lines[:_LINES_IN_MESSAGE])
    more = len(lines) - _LINES_IN_MESSAGE
    return f"{exc.detail}: {shown}" + (f" (and {more} more)" if more > 0 else "")
