"""Quotas per team: what a team may hold at once, and what it has now.

An operator sets a team's limits (`tuneq admin set-quota`); a limit left unset takes the
Settings default, and a default left unset is no limit. Three are checked where the
request comes in, in the transaction that would pass them, after the team's row is locked
so that two concurrent requests cannot both slip under a limit:

- queued jobs (queued or paused) and GPU-seconds in the rolling window, at `POST /jobs`:
  429, the request succeeds again once jobs start or the window rolls on;
- stored bytes (files, plus every artifact of the team's jobs), at `POST /files`: 403, a
  hard cap that only deleting files frees.

The fourth, running jobs, is not a reason to refuse a job: a team at its limit waits in the
queue while other teams' jobs start (tuneq.quotas.fair_share, at the claim).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tuneq.db import utcnow
from tuneq.errors import QuotaExceeded, StorageQuotaExceeded
from tuneq.files.models import File
from tuneq.jobs.models import Job, JobArtifact
from tuneq.jobs.states import LEASED, JobState
from tuneq.quotas.models import TeamQuota
from tuneq.settings import Settings
from tuneq.teams.models import Team

WAITING = (JobState.QUEUED, JobState.PAUSED)
# The quota's names, as the API and the CLI show them, and its column in team_quotas.
QUOTAS = {
    "running_jobs": "max_running_jobs",
    "queued_jobs": "max_queued_jobs",
    "stored_bytes": "max_stored_bytes",
    "gpu_seconds": "max_gpu_seconds",
    "gpu_window_seconds": "gpu_window_seconds",
}


@dataclass(frozen=True)
class Limits:
    """A team's limits; None: no limit."""

    running_jobs: int | None
    queued_jobs: int | None
    stored_bytes: int | None
    gpu_seconds: int | None
    gpu_window_seconds: int


@dataclass(frozen=True)
class Usage:
    running_jobs: int
    queued_jobs: int
    stored_bytes: int
    gpu_seconds: int  # in the rolling window


def defaults(settings: Settings) -> dict[str, int | None]:
    return {
        "running_jobs": settings.quota_running_jobs,
        "queued_jobs": settings.quota_queued_jobs,
        "stored_bytes": settings.quota_stored_bytes,
        "gpu_seconds": settings.quota_gpu_seconds,
        "gpu_window_seconds": settings.quota_gpu_window_seconds,
    }


def limits_for(db: Session, settings: Settings, team_id: str) -> Limits:
    values = defaults(settings)
    row = db.get(TeamQuota, team_id)
    if row is not None:
        for name, column in QUOTAS.items():
            if getattr(row, column) is not None:
                values[name] = getattr(row, column)
    return Limits(**values)  # type: ignore[arg-type]


def set_quota(db: Session, team: Team, changes: dict[str, int | None]) -> TeamQuota:
    """Set (an int) or clear (None: back to the default) some of a team's limits."""
    unknown = set(changes) - set(QUOTAS)
    if unknown:
        raise ValueError(f"unknown quota {sorted(unknown)[0]!r}")
    row = db.get(TeamQuota, team.id)
    if row is None:
        row = TeamQuota(team_id=team.id)
        db.add(row)
    for name, value in changes.items():
        setattr(row, QUOTAS[name], value)
    row.updated_at = utcnow()
    db.flush()
    return row


def usage_of(db: Session, team_id: str, *, window_seconds: int) -> Usage:
    counts = dict(
        db.execute(
            select(Job.state, func.count())
            .where(Job.team_id == team_id, Job.state.in_([*LEASED, *WAITING]))
            .group_by(Job.state)
        ).all()
    )
    return Usage(
        running_jobs=sum(counts.get(state, 0) for state in LEASED),
        queued_jobs=sum(counts.get(state, 0) for state in WAITING),
        stored_bytes=_stored_bytes(db, team_id),
        gpu_seconds=_gpu_seconds(db, team_id, window_seconds),
    )


def _stored_bytes(db: Session, team_id: str) -> int:
    """The team's files plus every artifact of its jobs."""
    files = db.scalar(select(func.coalesce(func.sum(File.bytes), 0)).where(File.team_id == team_id))
    artifacts = db.scalar(
        select(func.coalesce(func.sum(JobArtifact.bytes), 0))
        .join(Job, Job.id == JobArtifact.job_id)
        .where(Job.team_id == team_id)
    )
    return int(files or 0) + int(artifacts or 0)


def _gpu_seconds(db: Session, team_id: str, window_seconds: int) -> int:
    """Device-seconds the team's jobs held in the last `window_seconds`: each job's time from
    its first claim to its end (or now), clipped to the window, times its devices
    (`resources.gpus`, 1 unless it asked for more: a worker trains one job at a time). Time
    a job waited between attempts counts: an approximation on the generous side."""
    now = utcnow()
    start = now - timedelta(seconds=window_seconds)
    rows = db.execute(
        select(Job.started_at, Job.finished_at, Job.spec).where(
            Job.team_id == team_id,
            Job.started_at.is_not(None),
            (Job.finished_at.is_(None)) | (Job.finished_at > start),
        )
    ).all()
    total = 0.0
    for started, finished, spec in rows:
        begin, end = max(started, start), min(finished or now, now)
        gpus = int(((spec or {}).get("resources") or {}).get("gpus", 1))
        total += max(0.0, (end - begin).total_seconds()) * gpus
    return int(total)


def show(db: Session, settings: Settings, team: Team) -> dict[str, Any]:
    """What `GET /quota` and `tuneq admin show-quota` show: limits, usage, and what is left."""
    limits = limits_for(db, settings, team.id)
    usage = usage_of(db, team.id, window_seconds=limits.gpu_window_seconds)
    return {"object": "quota", "team": team.name, "limits": asdict(limits), "usage": asdict(usage)}


def lock_team(db: Session, team_id: str) -> None:
    """Serialise the quota checks of one team (PostgreSQL; SQLite's writers are serial)."""
    if db.get_bind().dialect.name == "postgresql":
        db.execute(select(Team.id).where(Team.id == team_id).with_for_update())


def check_submit(db: Session, settings: Settings, team: Team) -> None:
    """Raise QuotaExceeded when one more queued job, or more GPU time, would pass a limit.
    Call inside the transaction that creates the job."""
    lock_team(db, team.id)
    limits = limits_for(db, settings, team.id)
    if limits.queued_jobs is None and limits.gpu_seconds is None:
        return
    usage = usage_of(db, team.id, window_seconds=limits.gpu_window_seconds)
    if limits.queued_jobs is not None and usage.queued_jobs >= limits.queued_jobs:
        raise _exceeded(
            QuotaExceeded,
            "queued_jobs",
            limits.queued_jobs,
            usage.queued_jobs,
            f"the team has {usage.queued_jobs} jobs waiting, its limit; submit again once "
            "some have started (or cancel some)",
        )
    if limits.gpu_seconds is not None and usage.gpu_seconds >= limits.gpu_seconds:
        raise _exceeded(
            QuotaExceeded,
            "gpu_seconds",
            limits.gpu_seconds,
            usage.gpu_seconds,
            f"the team's jobs used {usage.gpu_seconds} GPU-seconds in the last "
            f"{limits.gpu_window_seconds} s, its limit",
        )


def check_storage(
    db: Session, settings: Settings, team: Team, *, incoming: int, lock: bool = True
) -> None:
    """Raise StorageQuotaExceeded when `incoming` more bytes would pass the team's cap
    (`lock`: in the transaction that stores them, so that two uploads cannot both fit)."""
    if lock:
        lock_team(db, team.id)
    limits = limits_for(db, settings, team.id)
    if limits.stored_bytes is None:
        return
    used = _stored_bytes(db, team.id)  # an upload needs no job counts nor GPU time
    if used + incoming > limits.stored_bytes:
        raise _exceeded(
            StorageQuotaExceeded,
            "stored_bytes",
            limits.stored_bytes,
            used,
            f"storing {incoming} more bytes would pass the team's cap of "
            f"{limits.stored_bytes} ({used} used): delete files or ask an operator",
        )


def _exceeded(
    kind: type[QuotaExceeded], quota: str, limit: int, current: int, detail: str
) -> QuotaExceeded:
    extra = {"quota": quota, "limit": limit, "current": current}
    return kind(f"quota {quota}: {detail}", extra=extra)
