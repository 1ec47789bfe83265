from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Connection,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    event,
    select,
    text,
)
from sqlalchemy.orm import Mapped, Mapper, mapped_column

from tuneq.db import Base, UTCDateTime, utcnow


class Job(Base):
    __tablename__ = "jobs"
    # Migration 0006 says why: the claim reads each team's oldest queued jobs from
    # ix_jobs_queued; no index holds lease_expires_at or progress, so a heartbeat's UPDATE
    # is HOT, with room for it on the page (fillfactor, PostgreSQL only).
    __table_args__ = (
        Index("ix_jobs_queued", "queue", "team_id", "created_at", "id",
              postgresql_where=text("state = 'queued'"), sqlite_where=text("state = 'queued'")),
        Index("ix_jobs_leased", "team_id",
              postgresql_where=text("state IN ('running', 'cancelling')"),
              sqlite_where=text("state IN ('running', 'cancelling')")),
        {"postgresql_with": {"fillfactor": 80}},
    )  # fmt: skip

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(100))
    queue: Mapped[str] = mapped_column(String(64))  # from the model's registry entry
    task: Mapped[str] = mapped_column(String(32))
    # Plain ids, not foreign keys: a finished job keeps naming its files after they are deleted.
    training_file_id: Mapped[str] = mapped_column(String(40), index=True)
    validation_file_id: Mapped[str | None] = mapped_column(String(40), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # as the user sent it
    resolved: Mapped[dict[str, Any]] = mapped_column(JSON)  # method + hyperparameters resolved
    estimate: Mapped[dict[str, Any]] = mapped_column(JSON)  # tokens, steps, duration
    suffix: Mapped[str | None] = mapped_column(String(64))
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSON, default=dict)

    # Lease: who runs it, until when (database clock), and the fence of the current attempt.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    fence: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    latest_checkpoint_key: Mapped[str | None] = mapped_column(String(512))
    latest_checkpoint_step: Mapped[int | None] = mapped_column(Integer)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class BelongsToJob:
    """What every row that belongs to a job has: its own id, the job's, and when it was written."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class JobEvent(BelongsToJob, Base):
    """A typed event: `message` (what happened) or `metrics` (a step's or an evaluation's)."""

    __tablename__ = "job_events"

    type: Mapped[str] = mapped_column(String(16))
    level: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


@event.listens_for(JobEvent, "before_insert")
def _events_of_a_job_commit_in_id_order(
    _: Mapper[Any], connection: Connection, row: JobEvent
) -> None:
    """Lock the job's row before an event of it takes an id, until the transaction ends.

    Readers resume after the last id they saw (`?after=`, SSE's Last-Event-ID). PostgreSQL
    hands out ids when rows are inserted, not when they commit: without this, an event
    inserted by the API while the worker's transaction with a lower id is still open would
    be seen first, and the lower one never. Under the lock, the writers of one job's events
    take ids in the order they commit. (SQLite already lets one writer in at a time.)
    """
    if connection.dialect.name == "postgresql":
        connection.execute(select(Job.id).where(Job.id == row.job_id).with_for_update())


class JobMetric(BelongsToJob, Base):
    """One point of the metrics series: a training step's or an evaluation's values."""

    __tablename__ = "job_metrics"

    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(8))  # train | eval
    values: Mapped[dict[str, float]] = mapped_column(JSON)


class JobCheckpoint(BelongsToJob, Base):
    __tablename__ = "job_checkpoints"

    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    storage_prefix: Mapped[str] = mapped_column(String(512))
    metrics: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)


class JobArtifact(BelongsToJob, Base):
    """A downloadable file: the final adapter, or one checkpoint's adapter, as .tar.gz; or the
    per-example diagnostics, as JSONL."""

    __tablename__ = "job_artifacts"

    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # adapter | checkpoint | diagnostics
    step: Mapped[int | None] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(512))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))


class OutboxMessage(BelongsToJob, Base):
    """'Job X may be ready', written in the job's transaction; the relay publishes it."""

    __tablename__ = "outbox"

    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    # Not published before this (a job handed back after a transient fault waits a while).
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime())
