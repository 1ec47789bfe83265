"""An attempt's writes to the database, each one transaction retried through blips.

A database that drops its connections or refuses new ones for a while (a restart, a
failover, a network blip) must not end a job that still holds its lease: each write is
tried again with capped exponential backoff and jitter for as long as the lease surely
holds (the heartbeat judges that), then gives up with `LeaseLapsed`: by then another
worker may own the job, and the attempt ends without another word. Once a write gets
through after failures, the outage is told to the job's events (it could not be while the
database was away). What is not transient is raised at once.

A transaction whose COMMIT was cut off may have been applied: the retry applies it again.
Every write here is either fenced (the same values again) or an append a reader tolerates
twice (an event, a metrics row); none counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

from tuneq.db import transaction
from tuneq.jobs.models import JobEvent
from worker.heartbeat import Heartbeat, outage_event
from worker.retry import RetryPolicy, is_transient

log = logging.getLogger(__name__)

T = TypeVar("T")


class LeaseLapsed(Exception):
    """The database stayed away until the lease may have lapsed: the attempt is over."""


class Journal:
    def __init__(
        self, sessions: sessionmaker[Session], heartbeat: Heartbeat, policy: RetryPolicy
    ) -> None:
        self.sessions, self.heartbeat, self.policy = sessions, heartbeat, policy

    def write(self, what: str, operation: Callable[[Session], T]) -> T:
        """`operation(db)` in one transaction, committed; retried on transient faults."""
        failures: list[str] = []
        started = time.monotonic()
        while True:
            try:
                with transaction(self.sessions) as db:
                    if failures:
                        db.add(self._outage_event(what, failures, time.monotonic() - started))
                    return operation(db)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                failures.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                delay = self.policy.delay(min(len(failures), 16))
                log.warning(
                    "database write (%s) of %s failed (%s); retrying in %.1f s",
                    what, self.heartbeat.claim.job_id, failures[-1], delay,
                )  # fmt: skip
                # wake early if the lease is lost meanwhile
                if self.heartbeat.lost.wait(min(delay, max(0.0, self.heartbeat.seconds_left()))):
                    raise LeaseLapsed(f"{what}: {failures[-1]}") from exc
                if self.heartbeat.lapsed():
                    raise LeaseLapsed(f"{what}: {failures[-1]}") from exc

    def _outage_event(self, what: str, failures: list[str], seconds: float) -> JobEvent:
        message = (
            f"the database was unreachable for {seconds:.1f} s ({failures[-1]}); "
            f"{what} went through after {len(failures)} "
            f"retr{'y' if len(failures) == 1 else 'ies'}"
        )
        return outage_event(self.heartbeat.claim.job_id, message, cause=failures[-1],
                            retries=len(failures), seconds=seconds)  # fmt: skip
