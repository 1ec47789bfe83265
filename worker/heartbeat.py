"""The lease heartbeat: a thread that renews the job's lease every lease_ttl/3 (DESIGN §3).

It is also how the training loop hears about the world: a lost lease, a cancel or a pause
request all turn `should_stop()` true, which the engine polls before every step.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from tuneq.db import transaction
from tuneq.jobs.lease import Claim, renew_lease

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, sessions: sessionmaker[Session], claim: Claim, *, lease_ttl: float) -> None:
        self.sessions = sessions
        self.claim = claim
        self.lease_ttl = lease_ttl
        self.lost = threading.Event()
        self.cancel_requested = threading.Event()
        self.pause_requested = threading.Event()
        self.progress: dict[str, Any] | None = None  # set by the training thread
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.job_id}")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopping.set()
        self._thread.join()

    def should_stop(self) -> bool:
        return self.lost.is_set() or self.cancel_requested.is_set() or self.pause_requested.is_set()

    def beat(self) -> None:
        """Renew once; a renewal that fails or errors means the lease can no longer be trusted."""
        try:
            with transaction(self.sessions) as db:
                renewal = renew_lease(
                    db, self.claim, lease_ttl=self.lease_ttl, progress=self.progress
                )
        except Exception:  # noqa: BLE001 - database unreachable: we cannot prove we own the job
            log.exception("lease renewal failed for %s", self.claim.job_id)
            self.lost.set()
            return
        if not renewal.held:
            log.warning("lease lost for %s (fence %s)", self.claim.job_id, self.claim.fence)
            self.lost.set()
        if renewal.cancel_requested:
            self.cancel_requested.set()
        if renewal.pause_requested:
            self.pause_requested.set()

    def _run(self) -> None:
        interval = self.lease_ttl / 3
        while not self._stopping.wait(interval) and not self.lost.is_set():
            self.beat()
