"""The one exception the SDK raises for what the API refused or could not be reached for:
the problem+json document (RFC 9457) the server sent, parsed into fields."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class ProblemItem:
    """One thing at fault: a field (dotted path), a line of an uploaded file, or a member of
    an uploaded archive."""

    message: str
    field: str | None = None
    line: int | None = None
    member: str | None = None

    def __str__(self) -> str:
        where = [self.member] if self.member is not None else []
        where += [f"line {self.line}"] if self.line is not None else []
        where += [self.field] if self.field else []
        return f"{', '.join(where)}: {self.message}" if where else self.message


class TuneqAPIError(Exception):
    """The API answered with an error, or could not be reached (`status` None then).

    `code` is the server's stable code (`invalid_training_file`, `not_found`, ...) or
    `connection_error`; `errors` lists the lines and fields at fault, when the input was.
    """

    def __init__(
        self,
        status: int | None,
        code: str,
        detail: str,
        *,
        errors: tuple[ProblemItem, ...] = (),
        param: str | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status or 'no answer'} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = errors
        self.param = param
        self.problem = problem or {"status": status, "code": code, "detail": detail}

    @classmethod
    def from_response(cls, status: int, body: bytes, reason: str) -> TuneqAPIError:
        """Parse a problem+json body; anything else (a proxy's HTML page) keeps its status."""
        try:
            problem = json.loads(body)
        except ValueError:
            problem = None
        if not isinstance(problem, dict):
            return cls(status, "http_error", reason or f"HTTP {status}")
        items = tuple(
            ProblemItem(str(e.get("message", "")), e.get("field"), e.get("line"), e.get("member"))
            for e in problem.get("errors") or ()
            if isinstance(e, dict)
        )
        return cls(
            status,
            str(problem.get("code") or "http_error"),
            str(problem.get("detail") or problem.get("title") or reason),
            errors=items,
            param=problem.get("param"),
            problem=problem,
        )

    @classmethod
    def unreachable(cls, url: str, cause: Exception) -> TuneqAPIError:
        # A presigned URL's query is its credential: name the place, never the signature.
        place = urlsplit(url)._replace(query="", fragment="").geturl()
        reason = cause or type(cause).__name__
        return cls(None, "connection_error", f"cannot reach {place}: {reason}")


class MissingSetting(ValueError):
    """The API's URL or key was neither given nor set in the environment."""
