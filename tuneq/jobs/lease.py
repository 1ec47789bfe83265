"""Who runs a job: claim with a lease, heartbeat renewals, fenced writes, the reaper (DESIGN §3).

Every statement here is one conditional UPDATE judged by the database's clock, so two
workers can never both believe they own a job: the loser's UPDATE matches no row. Each
claim takes a new fencing token; a worker's writes carry its token and stop matching the
moment another attempt claims the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from tuneq.db import db_now, seconds_from_now
from tuneq.jobs.models import Job, JobEvent, OutboxMessage
from tuneq.jobs.states import LEASED, JobState, move_to
from tuneq.webhooks.schemas import JOB_CANCELLED, JOB_FAILED
from tuneq.webhooks.service import enqueue_job_event


@dataclass(frozen=True)
class Claim:
    job_id: str
    owner: str
    attempt: int
    fence: int
    expires_at: datetime | None = None  # the lease's end, by the database's clock


@dataclass(frozen=True)
class Renewal:
    held: bool  # False: the lease is lost, stop at once
    cancel_requested: bool = False
    pause_requested: bool = False
    expires_at: datetime | None = None


def claim_job(db: Session, *, job_id: str, owner: str, lease_ttl: float) -> Claim | None:
    """Take the job if it is queued (or its lease expired); None means someone else has it."""
    row = db.execute(
        move_to(
            JobState.RUNNING,
            Job.id == job_id,
            # a running job only once its lease has expired
            or_(Job.state != JobState.RUNNING, Job.lease_expires_at < db_now()),
            Job.attempt < Job.max_attempts,
            Job.cancel_requested.is_(False),
        )
        .values(
            lease_owner=owner,
            attempt=Job.attempt + 1,
            fence=Job.fence + 1,
            lease_expires_at=seconds_from_now(lease_ttl),
            started_at=func.coalesce(Job.started_at, db_now()),
        )
        .returning(Job.attempt, Job.fence, Job.lease_expires_at)
    ).first()
    if row is None:
        return None
    return Claim(job_id, owner, row.attempt, row.fence, row.lease_expires_at)


def _fenced(claim: Claim) -> Any:
    return and_(Job.id == claim.job_id, Job.fence == claim.fence, Job.state.in_(LEASED))


def renew_lease(
    db: Session, claim: Claim, *, lease_ttl: float, progress: dict[str, Any] | None
) -> Renewal:
    values: dict[str, Any] = {"lease_expires_at": seconds_from_now(lease_ttl)}
    if progress is not None:
        values["progress"] = progress
    row = db.execute(
        update(Job)
        .where(_fenced(claim))
        .values(**values)
        .returning(Job.cancel_requested, Job.pause_requested, Job.lease_expires_at)
    ).first()
    if row is None:
        return Renewal(held=False)
    return Renewal(True, row.cancel_requested, row.pause_requested, row.lease_expires_at)


def fenced_update(
    db: Session, claim: Claim, *, state: JobState | None = None, **values: Any
) -> bool:
    """Write to the job only while this attempt still owns it; False when it does not, or
    when `state` is a move TRANSITIONS does not allow from the job's state."""
    statement = update(Job) if state is None else move_to(state)
    result = db.execute(statement.where(_fenced(claim)).values(**values))
    return (result.rowcount or 0) == 1


def requeue_delay(first_delay: float, attempt: int) -> float:
    """How long a job queued again after attempt `attempt` waits to be published: the first
    delay doubled each attempt, at most 10 minutes."""
    return min(600.0, first_delay * 2 ** (attempt - 1))


def reap_expired_leases(db: Session, *, first_delay: float = 0.0) -> list[tuple[str, JobState]]:
    """Jobs whose worker stopped heartbeating: queued again, or failed after max_attempts.
    A job queued again is published after `first_delay` doubled each attempt (at most 10
    minutes): a job that crashes its worker every time is not retried in a storm."""
    expired = db.execute(
        select(Job.id, Job.state, Job.attempt, Job.max_attempts)
        .where(Job.state.in_(LEASED), Job.lease_expires_at < db_now())
        .with_for_update(skip_locked=True)
    ).all()
    moved: list[tuple[str, JobState]] = []
    for job in expired:
        values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
        if job.state == JobState.CANCELLING:
            target, message = JobState.CANCELLED, "cancelled (its worker stopped answering)"
            values["finished_at"] = db_now()
        elif job.attempt < job.max_attempts:
            target = JobState.QUEUED
            delay = requeue_delay(first_delay, job.attempt)
            message = f"worker lost on attempt {job.attempt}; queued again"
            message += f", published in {delay:.0f} s" if delay else ""
        else:
            target = JobState.FAILED
            message = f"worker lost on attempt {job.attempt} of {job.max_attempts}"
            values["error"] = {"code": "worker_lost", "message": message, "param": None}
            values["finished_at"] = db_now()
        result = db.execute(move_to(target, Job.id == job.id).values(**values))
        if (result.rowcount or 0) != 1:
            continue  # a move the table refuses: nothing written, nothing to tell
        if target == JobState.QUEUED:
            not_before = seconds_from_now(delay) if delay else None
            db.add(OutboxMessage(job_id=job.id, not_before=not_before))
        else:
            ended = JOB_CANCELLED if target == JobState.CANCELLED else JOB_FAILED
            enqueue_job_event(db, job_id=job.id, event_type=ended)
        db.add(JobEvent(job_id=job.id, type="message", level="warning", message=message))
        moved.append((job.id, target))
    return moved


def hand_back(
    db: Session,
    claim: Claim,
    *,
    cause: str,
    first_delay: float,
    code: str = "infrastructure_unavailable",
) -> JobState | None:
    """The attempt ended on a fault that another attempt may not meet (a transient fault
    that outlasted its retries, a full disk, a crash): the job goes back to the queue and
    is published again after a delay, `first_delay` doubled each attempt up to 10 minutes
    (its next attempt resumes from its last checkpoint); on its last attempt it fails with
    `code` instead. The state it moved to; None when this attempt no longer owns the job."""
    job = db.get(Job, claim.job_id)
    if job is None:
        return None
    delay_seconds = requeue_delay(first_delay, job.attempt)
    values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
    if job.attempt >= job.max_attempts:
        message = f"{cause}; attempt {job.attempt} of {job.max_attempts}, the last, ended"
        error = {"code": code, "message": message, "param": None}
        if not fenced_update(db, claim, state=JobState.FAILED, error=error,
                             finished_at=db_now(), **values):  # fmt: skip
            return None
        enqueue_job_event(db, job_id=job.id, event_type=JOB_FAILED)
        failed = f"job failed: {message}"
        data = {"code": code}
        db.add(JobEvent(job_id=job.id, type="message", level="error", message=failed, data=data))
        return JobState.FAILED
    if not fenced_update(db, claim, state=JobState.QUEUED, **values):
        return None
    db.add(OutboxMessage(job_id=job.id, not_before=seconds_from_now(delay_seconds)))
    message = (
        f"{cause}; attempt {job.attempt} of {job.max_attempts} ended, the job is queued "
        f"again and resumes from its last checkpoint in {delay_seconds:.0f} s"
    )
    data = {"code": "handed_back", "fault": code, "delay_seconds": round(delay_seconds, 1)}
    db.add(JobEvent(job_id=job.id, type="message", level="warning", message=message, data=data))
    return JobState.QUEUED
