"""Transient faults of the infrastructure, retried in place: a store that resets a
connection, times out or answers 5xx, or a database that drops its connections, refuses
new ones or aborts a transaction for serialization, is tried again with capped exponential
backoff and jitter, a bounded number of times, each retry told to the job's events. What
is not transient (a missing key, a refused credential, a constraint, a bug) is raised at
once.

boto3 already retries each call a few times within seconds; this covers the outages that
outlast those (a store restarting, a network blip of a minute).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from s3transfer.exceptions import S3DownloadFailedError, S3UploadFailedError
from sqlalchemy import exc as sa

from tuneq.storage import ObjectStore

T = TypeVar("T")

_TRANSIENT_NETWORK = (
    ConnectionError,  # resets, refusals, broken pipes (OSError's connection family)
    TimeoutError,
    EndpointConnectionError,
    ConnectionClosedError,
    ConnectTimeoutError,
    ReadTimeoutError,
)
# The database: connections refused, dropped or timed out (OperationalError, which the
# drivers also raise for serialization failures and deadlocks), the pool exhausted.
_TRANSIENT_DATABASE = (sa.OperationalError, sa.DisconnectionError, sa.TimeoutError)
# s3transfer raises these while handling the fault, without `from`: the fault is their context.
_WRAPPERS = (S3UploadFailedError, S3DownloadFailedError)
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "503"}


def is_transient(exc: BaseException) -> bool:
    """A fault that may pass by itself: a network fault, or a store that says it is busy,
    whether raised as it is or wrapped by s3transfer (which keeps the cause it wraps)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _transient_itself(current):
            return True
        current = (
            getattr(current, "last_exception", None)  # s3transfer's RetriesExceededError
            or current.__cause__
            or (current.__context__ if isinstance(current, _WRAPPERS) else None)
        )
    return False


def _transient_itself(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT_NETWORK):
        return True
    if isinstance(exc, _TRANSIENT_DATABASE):
        return True
    if isinstance(exc, sa.DBAPIError) and (
        exc.connection_invalidated or _transient_sqlstate(getattr(exc.orig, "sqlstate", None))
    ):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or error.get("Code") in _TRANSIENT_CODES
    return False


def _transient_sqlstate(state: str | None) -> bool:
    """PostgreSQL's codes for faults that pass: the connection's (08), serialization and
    deadlock (40001, 40P01), the server shutting down or starting (57P01-57P03), too many
    connections (53300), a session ended for idling in its transaction (25P03)."""
    if state is None:
        return False
    return state.startswith("08") or state in {
        "40001", "40P01", "57P01", "57P02", "57P03", "53300", "25P03"
    }  # fmt: skip


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries in all, the first included
    base_seconds: float = 1.0
    cap_seconds: float = 60.0

    def delay(self, retry: int) -> float:
        """Before retry `retry` (1, 2, ...): full jitter under min(cap, base * 2^(retry-1))."""
        return random.uniform(0, min(self.cap_seconds, self.base_seconds * 2 ** (retry - 1)))


def retry_transient(
    operation: Callable[[], T],
    *,
    what: str,
    policy: RetryPolicy,
    report: Callable[[str, dict[str, Any]], None],
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`operation()`, tried again on a transient fault up to the policy's attempts."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts:
                exc.tries = attempt  # type: ignore[attr-defined] - for the hand-back's message
                raise
            delay = policy.delay(attempt)
            cause = f"{type(exc).__name__}: {exc}"
            report(
                f"{what} failed ({cause}); retrying in {delay:.1f} s "
                f"(try {attempt + 1} of {policy.attempts})",
                {"code": "transient_fault", "cause": cause, "try": attempt + 1,
                 "tries": policy.attempts, "delay_seconds": round(delay, 2)},
            )  # fmt: skip
            sleep(delay)
    raise AssertionError("unreachable")


class RetryingStore:
    """An ObjectStore whose every call is retried on transient faults (a worker's view of
    the store for one attempt). Presigned URLs and streams pass straight through."""

    _PLAIN = frozenset({"presigned_url", "open_stream", "check"})

    def __init__(
        self,
        store: ObjectStore,
        policy: RetryPolicy,
        report: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self._store, self._policy, self._report = store, policy, report

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if name in self._PLAIN or not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            target = f" {args[0]}" if args and isinstance(args[0], str) else ""
            return retry_transient(
                lambda: attribute(*args, **kwargs),
                what=f"store {name}{target}",
                policy=self._policy,
                report=self._report,
            )

        return call
