"""The history a worker leaves for bench/faults.py's checker (TUNEQ_HISTORY_LOG).

One JSON line per claim, lease renewal, checkpoint, hand-back/stop ("release") and job end
("end"), each stamped with the database's clock taken inside the write's transaction after
its UPDATE (which holds the job's row lock until the commit, so the stamps order the writes
as the database applied them), and appended only once the transaction committed. The
checker reads every worker's lines offline and checks the lease invariants: at most one
live lease per job, never a write under an old fence. Unset (a deployment): nothing is
written and nothing is asked of the database.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from tuneq.db import db_now
from tuneq.jobs.lease import Claim


class History:
    def __init__(self, path: Path | None) -> None:
        self.path = path

    def note(self, db: Session, kind: str, claim: Claim, **fields: Any) -> None:
        """Record `kind` for the claim once `db`'s transaction commits."""
        if self.path is None:
            return
        at = db.scalar(select(db_now()))
        record = {
            "kind": kind,
            "job": claim.job_id,
            "attempt": claim.attempt,
            "fence": claim.fence,
            "owner": claim.owner,
            "pid": os.getpid(),
            "db_time": _epoch(at),
            **{k: _epoch(v) if isinstance(v, datetime) else v for k, v in fields.items()},
        }
        event.listen(db, "after_commit", lambda _: self._append(record), once=True)

    def _append(self, record: dict[str, Any]) -> None:
        assert self.path is not None
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        # one write of a short line to an O_APPEND file: whole lines, whatever the writers
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()
