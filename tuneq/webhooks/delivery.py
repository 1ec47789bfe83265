"""Sending what is owed: beat's maintenance worker runs `deliver_due` every
TUNEQ_WEBHOOK_POLL_SECONDS (never the API process).

    claim (one transaction: the due rows, FOR UPDATE SKIP LOCKED on PostgreSQL; each
           claim takes the next attempt number and pushes next_attempt_at out as a lease)
    → send, outside any transaction: target checked again, signed, POSTed, no redirects
    → record (one transaction per attempt, fenced by the attempt number): the attempt,
      and the delivery succeeded, due again after the schedule's wait, or failed for good

Two deliverers never send the same attempt: a claim is a conditional UPDATE that only one
of them wins, and a deliverer that outlived its lease cannot record over a newer attempt.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from tuneq import __version__
from tuneq.db import db_now, seconds_from_now, transaction
from tuneq.errors import InvalidRequest
from tuneq.settings import Settings
from tuneq.webhooks.models import DeliveryState, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from tuneq.webhooks.signing import signed_headers
from tuneq.webhooks.targets import check_target

log = logging.getLogger(__name__)

SENDERS = 8  # attempts claimed and sent at once, so one slow receiver does not hold the rest
RESPONSE_BYTES = 4096  # what is read of an answer, at most
ERROR_CHARS = 300  # of an error or a non-2xx answer, kept on the attempt
JITTER = 0.2  # each retry waits its scheduled time ± 20%


@dataclass(frozen=True)
class Claimed:
    """One attempt this deliverer won: the delivery, the attempt's number, what to send."""

    delivery_id: str
    attempt: int
    url: str
    secret: str
    body: str


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def succeeded(self) -> bool:
        return self.error is None


def deliver_due(sessions: sessionmaker[Session], settings: Settings) -> int:
    """Claim what is due a few at a time, send each batch side by side, record what
    happened; how many attempts were made. Stops when nothing more is due or after about
    one poll interval: beat's worker runs the relay and the reaper between runs."""
    claimed = _claim(sessions, settings)
    if not claimed:
        return 0
    started, tried = time.monotonic(), 0
    with _client(settings) as client, ThreadPoolExecutor(max_workers=SENDERS) as pool:
        while claimed:
            list(pool.map(partial(_attempt, sessions, settings, client), claimed))
            tried += len(claimed)
            if len(claimed) < SENDERS or time.monotonic() - started > settings.webhook_poll_seconds:
                break
            claimed = _claim(sessions, settings)
    return tried


def _claim(sessions: sessionmaker[Session], settings: Settings) -> list[Claimed]:
    with transaction(sessions) as db:
        return claim_due(db, limit=SENDERS, lease_seconds=lease_seconds(settings))


def _client(settings: Settings) -> httpx.Client:
    return httpx.Client(
        timeout=httpx.Timeout(settings.webhook_timeout_seconds),
        follow_redirects=False,
        # No proxy from the environment: it would connect to names we did not check.
        trust_env=False,
        # No connection kept: connections are to addresses, and another endpoint's name
        # on the same address must not ride on this one's TLS session.
        limits=httpx.Limits(max_keepalive_connections=0),
    )


def lease_seconds(settings: Settings) -> float:
    """How long a claimed attempt is left to its deliverer: connect, send and read, with room."""
    return 3 * settings.webhook_timeout_seconds + 30


def claim_due(db: Session, *, limit: int, lease_seconds: float) -> list[Claimed]:
    """Take up to `limit` due deliveries: each gets its next attempt number, and is not due
    again until the lease ends (a deliverer that died leaves it to the next run)."""
    due = (
        WebhookDelivery.state == DeliveryState.PENDING,
        WebhookDelivery.next_attempt_at <= db_now(),
    )
    rows = db.execute(
        select(
            WebhookDelivery.id, WebhookEndpoint.url, WebhookEndpoint.secret, WebhookDelivery.body
        )
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(*due)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True, of=WebhookDelivery)
    ).all()
    if not rows:
        return []
    won = db.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_([row.id for row in rows]), *due)
        .values(
            attempts=WebhookDelivery.attempts + 1,
            next_attempt_at=seconds_from_now(lease_seconds),
        )
        .returning(WebhookDelivery.id, WebhookDelivery.attempts)
    ).all()
    attempts = {row.id: row.attempts for row in won}
    return [
        Claimed(row.id, attempts[row.id], row.url, row.secret, row.body)
        for row in rows
        if row.id in attempts
    ]


def send(claimed: Claimed, settings: Settings, client: httpx.Client) -> Outcome:
    """One attempt, signed with this attempt's timestamp, to an address checked just now."""
    started = time.monotonic()

    def outcome(status_code: int | None, error: str | None) -> Outcome:
        elapsed = round(1000 * (time.monotonic() - started))
        return Outcome(status_code, error[:ERROR_CHARS] if error else None, elapsed)

    try:
        target = check_target(claimed.url, settings)
    except InvalidRequest as err:
        return outcome(None, f"refused: {err.errors[0].message}")
    url = httpx.URL(claimed.url)
    headers = {
        # The URL carries the checked address; the name goes in Host and, for TLS, in the
        # server name the certificate is checked against.
        "host": url.netloc.decode("ascii"),
        "content-type": "application/json",
        "user-agent": f"tuneq-webhooks/{__version__}",
        **signed_headers(claimed.secret, claimed.delivery_id, int(time.time()), claimed.body),
    }
    extensions = {"sni_hostname": target.host} if url.scheme == "https" else {}
    request = client.build_request(
        "POST",
        url.copy_with(host=str(target.address)),
        content=claimed.body.encode(),
        headers=headers,
        extensions=extensions,
    )
    try:
        response = client.send(request, stream=True)
        try:
            answer = _read_capped(response, started + settings.webhook_timeout_seconds)
        finally:
            response.close()
    except httpx.TimeoutException:
        return outcome(None, f"timed out after {settings.webhook_timeout_seconds:g} s")
    except httpx.HTTPError as err:
        return outcome(None, f"{type(err).__name__}: {err}")
    if 200 <= response.status_code < 300:
        return outcome(response.status_code, None)
    return outcome(response.status_code, f"HTTP {response.status_code}: {answer}".rstrip(": "))


def _read_capped(response: httpx.Response, deadline: float) -> str:
    """The start of the answer, a receiver's error message: at most RESPONSE_BYTES, and
    nothing more once the deadline passed (a receiver trickling bytes is not waited out)."""
    read = b""
    for chunk in response.iter_raw():
        read += chunk
        if len(read) >= RESPONSE_BYTES or time.monotonic() > deadline:
            break
    return read[:RESPONSE_BYTES].decode("utf-8", "replace").strip()


def record_attempt(
    db: Session, claimed: Claimed, outcome: Outcome, schedule: Sequence[float]
) -> bool:
    """Write the attempt and what follows it; False when the delivery is no longer this
    attempt's (its endpoint deleted, or a later attempt claimed it)."""
    if outcome.succeeded:
        values = {"state": DeliveryState.SUCCEEDED, "next_attempt_at": None}
    else:
        wait = retry_wait(schedule, claimed.attempt)
        values = (
            {"state": DeliveryState.FAILED, "next_attempt_at": None}
            if wait is None
            else {"next_attempt_at": seconds_from_now(wait)}
        )
    result = db.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == claimed.delivery_id,
            WebhookDelivery.attempts == claimed.attempt,
            WebhookDelivery.state == DeliveryState.PENDING,
        )
        .values(**values)
    )
    if (result.rowcount or 0) != 1:
        return False
    db.add(
        WebhookAttempt(
            delivery_id=claimed.delivery_id,
            attempt=claimed.attempt,
            status_code=outcome.status_code,
            error=outcome.error,
            duration_ms=outcome.duration_ms,
        )
    )
    return True


def retry_wait(
    schedule: Sequence[float], attempt: int, rand: Callable[[], float] = random.random
) -> float | None:
    """Seconds before the attempt after `attempt` (1 is the first), jittered; None when the
    schedule is spent (1 + len(schedule) attempts in all)."""
    if attempt > len(schedule):
        return None
    return schedule[attempt - 1] * (1 + JITTER * (2 * rand() - 1))


def _attempt(
    sessions: sessionmaker[Session], settings: Settings, client: httpx.Client, claimed: Claimed
) -> None:
    outcome = send(claimed, settings, client)
    with transaction(sessions) as db:
        recorded = record_attempt(db, claimed, outcome, settings.webhook_retry_schedule_seconds)
    log.info(
        "webhook delivery %s attempt %d: %s%s",
        claimed.delivery_id,
        claimed.attempt,
        "delivered" if outcome.succeeded else outcome.error,
        "" if recorded else " (not recorded: the delivery was deleted or claimed again)",
    )
