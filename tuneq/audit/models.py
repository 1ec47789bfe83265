from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from tuneq.db import Base, UTCDateTime, utcnow


class AuditRecord(Base):
    """One state-changing request: who (team, key prefix), what (action, object), when, and
    the request id that ties it to the logs."""

    __tablename__ = "audit_records"
    __table_args__ = (Index("ix_audit_records_team_id_id", "team_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    key_prefix: Mapped[str | None] = mapped_column(String(16))  # None: an operator's CLI
    action: Mapped[str] = mapped_column(String(32))
    object_type: Mapped[str] = mapped_column(String(16))
    object_id: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
