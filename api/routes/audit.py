"""`GET /audit`: the caller's team's audit trail, newest first. Thin: the records are
written by each use case (tuneq.audit.service.record)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.deps import DbDep, TeamDep
from api.openapi_docs import responses
from tuneq.audit import service
from tuneq.audit.schemas import AuditRecordPublic, AuditRecordsPublic
from tuneq.audit.service import Action
from tuneq.db import MAX_ROW_ID

router = APIRouter(prefix="/audit", tags=["audit"])

Limit = Annotated[int, Query(ge=1, le=100)]


@router.get("", response_model=AuditRecordsPublic, responses=responses(422))
def list_audit_records(
    team: TeamDep,
    db: DbDep,
    limit: Limit = 20,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_ROW_ID, description="the last id of the previous page")
    ] = None,
    action: Action | None = None,
) -> Any:
    """Who changed what in the team: every job, file, key and webhook change, with the key
    (its prefix) that asked and the request's X-Request-ID."""
    rows, has_more = service.list_records(db=db, team=team, limit=limit, after=after, action=action)
    return AuditRecordsPublic(data=[AuditRecordPublic.of(r) for r in rows], has_more=has_more)
