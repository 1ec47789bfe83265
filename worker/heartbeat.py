"""The lease heartbeat: a thread that renews the job's lease every lease_ttl/3 (DESIGN §3).

It is also how the training loop hears about the world: a lost lease, a cancel or a pause
request all turn `should_stop()` true, which the engine polls before every step.

A renewal that fails (the database restarting, a network blip) is not yet a lost lease:
the lease the database granted still runs, so the heartbeat tries again sooner and the job
trains on. Only when the lease may have lapsed, judged on this machine's monotonic clock
from the start of the last renewal that succeeded (the database stamped its deadline after
that instant), is the lease lost: the job stops by itself, within its lease, whatever the
database is doing. A renewal the database refuses (another attempt holds the job) is lost
at once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from tuneq.db import transaction
from tuneq.jobs.lease import Claim, renew_lease
from tuneq.jobs.models import JobEvent
from worker.history import History

log = logging.getLogger(__name__)

# The part of the lease a worker gives up before it lapses: time for the step in flight.
_MARGIN = 1 / 6


class Heartbeat:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        claim: Claim,
        *,
        lease_ttl: float,
        claimed_at: float | None = None,
        history: History | None = None,
    ) -> None:
        """`claimed_at`: time.monotonic() taken before the claim's transaction began."""
        self.sessions = sessions
        self.claim = claim
        self.lease_ttl = lease_ttl
        self.history = history or History(None)
        self.lost = threading.Event()
        self.cancel_requested = threading.Event()
        self.pause_requested = threading.Event()
        self.progress: dict[str, Any] | None = None  # set by the training thread
        self.failed_renewals = 0  # in a row; 0 once one succeeds
        self._failing_since: float | None = None
        self._last_failure = ""
        started = time.monotonic() if claimed_at is None else claimed_at
        self._deadline = started + lease_ttl * (1 - _MARGIN)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.job_id}")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopping.set()
        self._thread.join()

    def should_stop(self) -> bool:
        return self.lapsed() or self.cancel_requested.is_set() or self.pause_requested.is_set()

    def lapsed(self) -> bool:
        """True once the lease is lost, or may have lapsed with no renewal to prove it held."""
        if not self.lost.is_set() and time.monotonic() >= self._deadline:
            log.error(
                "lease of %s not renewed for %.0f s (%d renewals failed): stopping",
                self.claim.job_id, self.lease_ttl * (1 - _MARGIN), self.failed_renewals,
            )  # fmt: skip
            self.lost.set()
        return self.lost.is_set()

    def seconds_left(self) -> float:
        """How long the lease surely holds yet, by this machine's clock."""
        return self._deadline - time.monotonic()

    def beat(self) -> bool:
        """Renew once; False when the renewal could not reach the database."""
        started = time.monotonic()
        try:
            with transaction(self.sessions) as db:
                renewal = renew_lease(
                    db, self.claim, lease_ttl=self.lease_ttl, progress=self.progress
                )
                if renewal.held:
                    self.history.note(db, "renew", self.claim, expires=renewal.expires_at)
                    if self.failed_renewals:
                        db.add(self._recovered_event())
        except Exception as exc:  # noqa: BLE001 - the database may be back before the lease ends
            self.failed_renewals += 1
            self._last_failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            self._failing_since = self._failing_since or started
            if not self.lapsed():
                log.warning(
                    "lease renewal of %s failed (%s: %s); the lease holds %.1f s more",
                    self.claim.job_id, type(exc).__name__, exc, self.seconds_left(),
                )  # fmt: skip
            return False
        self.failed_renewals, self._failing_since = 0, None
        if not renewal.held:
            log.warning("lease lost for %s (fence %s)", self.claim.job_id, self.claim.fence)
            self.lost.set()
            return True
        self._deadline = started + self.lease_ttl * (1 - _MARGIN)
        if renewal.cancel_requested:
            self.cancel_requested.set()
        if renewal.pause_requested:
            self.pause_requested.set()
        return True

    def _recovered_event(self) -> JobEvent:
        """The outage the lease rode out, told once the database answers again."""
        seconds = time.monotonic() - (self._failing_since or time.monotonic())
        n, cause = self.failed_renewals, self._last_failure or "unknown"
        message = (
            f"lease renewal failed {n} time{'s' if n != 1 else ''} over {seconds:.1f} s "
            f"({cause}); renewed, the job goes on"
        )
        return outage_event(self.claim.job_id, message, cause=cause, retries=n, seconds=seconds)

    def _run(self) -> None:
        interval = self.lease_ttl / 3
        reached = True
        # after a failed renewal, try again four times as often while the lease runs
        while not self._stopping.wait(interval if reached else interval / 4):
            if self.lapsed():
                return
            reached = self.beat()


def outage_event(
    job_id: str, message: str, *, cause: str, retries: int, seconds: float
) -> JobEvent:
    """A database outage the attempt rode out (a renewal's, or a journal write's), as the
    `transient_fault` event a user reads."""
    data = {"code": "transient_fault", "cause": cause, "retries": retries,
            "seconds": round(seconds, 1)}  # fmt: skip
    return JobEvent(job_id=job_id, type="message", level="warning", message=message, data=data)
