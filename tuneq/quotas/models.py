from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from tuneq.db import Base, UTCDateTime, utcnow


class TeamQuota(Base):
    """An operator's limits for one team; a column left NULL takes the Settings default."""

    __tablename__ = "team_quotas"

    team_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True
    )
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    max_gpu_seconds: Mapped[int | None] = mapped_column(BigInteger)  # per rolling window
    gpu_window_seconds: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
