"""The audit trail: who changed what, recorded in the same transaction as the change.

Each use case that changes something (a job created or steered, a file uploaded, a key
revoked...) calls `record` inside its own transaction, so a change committed has its
record and a request refused (or rolled back) has none. The `Actor` is whoever asked: a
team's key in a request, or an operator at the CLI (no key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneq.audit.models import AuditRecord
from tuneq.teams.models import Team

Action = Literal[
    "job.create",
    "job.cancel",
    "job.pause",
    "job.resume",
    "job.delete",
    "file.upload",
    "file.delete",
    "key.create",
    "key.revoke",
    "webhook.create",
    "webhook.delete",
]
ACTIONS: tuple[str, ...] = get_args(Action)


@dataclass(frozen=True)
class Actor:
    """Who asks for a change, as the audit trail names them."""

    team_id: str
    key_prefix: str | None = None  # None: an operator at the CLI, not a key
    request_id: str | None = None  # the X-Request-ID that ties the record to the logs


def record(db: Session, actor: Actor | None, action: Action, object_id: str | None) -> None:
    """Add the record to the caller's transaction; no actor: not a request anyone made (a
    test, a script calling the service directly), nothing to record."""
    if actor is None:
        return
    db.add(
        AuditRecord(
            team_id=actor.team_id,
            key_prefix=actor.key_prefix,
            action=action,
            object_type=action.partition(".")[0],
            object_id=object_id,
            request_id=actor.request_id,
            data={},
        )
    )


def list_records(
    *, db: Session, team: Team, limit: int, after: int | None = None, action: str | None = None
) -> tuple[list[AuditRecord], bool]:
    """A page of the team's records, newest first (after the record `after`), and whether
    more follow."""
    query = select(AuditRecord).where(AuditRecord.team_id == team.id)
    if after is not None:
        query = query.where(AuditRecord.id < after)
    if action is not None:
        query = query.where(AuditRecord.action == action)
    rows = list(db.scalars(query.order_by(AuditRecord.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
