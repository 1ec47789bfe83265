"""What `GET /audit` shows: the team's records, newest first."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel
from pydantic import Field as Member

from tuneq.audit.models import AuditRecord
from tuneq.documents import unix_seconds


class AuditRecordPublic(BaseModel):
    id: int = Member(description="the cursor for `after`")
    object: Literal["audit_record"] = "audit_record"
    action: str = Member(examples=["job.create"])
    object_type: str = Member(examples=["job"])
    object_id: str | None = Member(description="the job, file, key prefix or webhook acted on")
    key_prefix: str | None = Member(description="the key that asked; null: an operator's CLI")
    request_id: str | None = Member(description="the request's X-Request-ID, as in the logs")
    created_at: int = Member(description="unix seconds")

    @classmethod
    def of(cls, row: AuditRecord) -> AuditRecordPublic:
        return cls(
            id=row.id,
            action=row.action,
            object_type=row.object_type,
            object_id=row.object_id,
            key_prefix=row.key_prefix,
            request_id=row.request_id,
            created_at=unix_seconds(row.created_at) or 0,
        )


class AuditRecordsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditRecordPublic]
    has_more: bool
