"""HTTP for the SDK: the API key, problem+json errors, and retries that are safe.

A request is retried on 429, on 5xx and when the connection fails, after a capped
exponential backoff with jitter, or after the `Retry-After` the server asked for. A POST
that creates something carries an Idempotency-Key made once per call, so that a retry of
a request the server did act on returns what the first one created (DESIGN §3). A POST
that steers a job (cancel, pause, resume) has no key: it is retried only where the server
cannot have acted (429, 503, or a connection never made).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from tuneq.client.errors import TuneqAPIError

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
NOT_ACTED_STATUSES = frozenset({429, 503})  # the server refused before doing anything


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait; `sleep` is a parameter so a caller can watch it."""

    max_retries: int = 4
    backoff_seconds: float = 0.5
    max_backoff_seconds: float = 8.0
    max_retry_after_seconds: float = 60.0
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `attempt` (0 for the first retry)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after_seconds)
        backoff = min(self.max_backoff_seconds, self.backoff_seconds * 2**attempt)
        return backoff * random.uniform(0.5, 1.0)


def retry_after_seconds(response: httpx.Response) -> float | None:
    """`Retry-After` as seconds: either form of RFC 9110 (delta-seconds or an HTTP date)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def new_idempotency_key() -> str:
    return f"tuneq-sdk-{uuid.uuid4()}"


class Transport:
    """An httpx client bound to one API and key (or none), sending requests with `RetryPolicy`."""

    def __init__(
        self, base_url: str, api_key: str | None, *, timeout: float, retry: RetryPolicy
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = retry
        headers = {"User-Agent": "tuneq-sdk"}
        if api_key is not None:  # None: a presigned URL, which must not see our key
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            follow_redirects=False,  # a download's redirect is followed without our key
        )

    def close(self) -> None:
        self.http.close()

    def json(self, method: str, path: str, *, create: bool = False, **kwargs: Any) -> Any:
        """Send, retrying as the module says, and return the decoded JSON of a 2xx answer."""
        with self.stream(method, path, create=create, **kwargs) as response:
            return response.json() if response.read() else None

    @contextmanager
    def stream(
        self, method: str, path: str, *, create: bool = False, **kwargs: Any
    ) -> Iterator[httpx.Response]:
        """The 2xx (or 3xx) response, its body not yet read; errors raise TuneqAPIError."""
        if create:
            kwargs["headers"] = {"Idempotency-Key": new_idempotency_key()} | kwargs.get(
                "headers", {}
            )
        retry_any = method in ("GET", "HEAD", "DELETE") or create
        retryable = RETRY_STATUSES if retry_any else NOT_ACTED_STATUSES
        attempt = 0
        while True:
            last = attempt == self.retry.max_retries
            request = self.http.build_request(method, path, **kwargs)
            try:
                response = self.http.send(request, stream=True)
            except httpx.TransportError as exc:
                safe = retry_any or isinstance(exc, httpx.ConnectError)
                if last or not safe:
                    raise TuneqAPIError.unreachable(self.base_url, exc) from exc
                self.retry.sleep(self.retry.delay(attempt, None))
                attempt += 1
                continue
            try:
                if response.status_code in retryable and not last:
                    wait = self.retry.delay(attempt, retry_after_seconds(response))
                    response.close()
                    self.retry.sleep(wait)
                    attempt += 1
                    continue
                if response.status_code >= 400:
                    raise TuneqAPIError.from_response(
                        response.status_code, response.read(), response.reason_phrase
                    )
                yield response
                return
            finally:
                response.close()
