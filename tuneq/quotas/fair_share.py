"""Fair share between teams: the claim, not the broker's order, picks the next job.

A run_job message says "a job may be ready on this queue"; it names one job, the one whose
submission (or hand-back) published it. The worker that receives it claims the job the
database says is due (DESIGN §3):

- the named job itself when it is running and its lease expired (an attempt that lost its
  worker: it already holds its team's slot);
- otherwise, among the queue's queued jobs, one of the team with the least running work
  (jobs running or cancelling, on every queue), oldest first within a team, skipping the
  teams at their running-jobs quota: they wait without blocking anyone.

Messages are tokens: one per queued job is published, and every claim consumes one, so a
message whose job another message already started claims the next job due, and a message
that finds nothing it may claim is dropped. A team at its quota can have had its messages
dropped; when one of its jobs stops running, `wake_waiting` publishes one again for its
oldest waiting job (the worker that ran it, and the reaper, call it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, func, not_, select
from sqlalchemy.orm import Session

from tuneq.db import db_now
from tuneq.jobs.lease import Claim, claim_job
from tuneq.jobs.models import Job, OutboxMessage
from tuneq.jobs.states import LEASED, JobState
from tuneq.quotas.models import TeamQuota
from tuneq.quotas.service import defaults, limits_for, lock_team
from tuneq.settings import Settings

CANDIDATES = 20  # read at a time, tried in order until one claim succeeds
ROUNDS = 5  # reads at most: workers claiming at once may have taken the first candidates


@dataclass(frozen=True)
class _Candidate:
    job_id: str
    team_id: str
    limited: bool  # the team has a running-jobs quota: recount under its lock


def claim_next(
    db: Session, *, job_id: str, owner: str, lease_ttl: float, settings: Settings
) -> Claim | None:
    """Claim the job due on the queue of `job_id`'s message; None: nothing this worker may
    claim now (the message is a duplicate, or every waiting team is at its quota)."""
    named = db.execute(
        select(Job.queue, Job.state, Job.lease_expires_at < db_now()).where(Job.id == job_id)
    ).first()
    if named is None:
        return None
    queue, state, expired = named
    if state in LEASED and expired:  # its worker was lost: this attempt resumes it
        claim = claim_job(db, job_id=job_id, owner=owner, lease_ttl=lease_ttl)
        if claim is not None:
            return claim
    tried: list[str] = []
    for _ in range(ROUNDS):
        candidates = _candidates(db, settings, queue, tried)
        for candidate in candidates:
            tried.append(candidate.job_id)
            if not _lock_if_free(db, candidate.job_id):
                continue  # another worker claims it now, or has
            if candidate.limited and not _has_room(db, settings, candidate.team_id):
                continue
            claim = claim_job(db, job_id=candidate.job_id, owner=owner, lease_ttl=lease_ttl)
            if claim is not None:
                return claim
        if len(candidates) < CANDIDATES:
            break
    return None


def _lock_if_free(db: Session, job_id: str) -> bool:
    """Lock the job's row if it is still claimable and no other transaction holds it.
    Workers that claim at once read the same candidates: without SKIP LOCKED each waited
    for the one before it to commit, and the claims ran one at a time."""
    free = select(Job.id).where(Job.id == job_id, *_claimable())
    return db.scalar(free.with_for_update(skip_locked=True)) is not None


def _running_by_team(db: Session, team_ids: list[str] | None = None) -> dict[str, int]:
    statement = select(Job.team_id, func.count()).where(Job.state.in_(LEASED))
    if team_ids is not None:
        statement = statement.where(Job.team_id.in_(team_ids))
    return dict(db.execute(statement.group_by(Job.team_id)).all())  # type: ignore[arg-type]


def _claimable() -> list[Any]:
    """A queued job a worker may start now: not cancelled, attempts left, and not held
    back by a hand-back's delay (its outbox row not yet due)."""
    # The few held back, read once: a correlated NOT EXISTS with the clock in it is not
    # made a join, and probed the outbox once for every queued job of every claim.
    held_back = select(OutboxMessage.job_id).where(
        OutboxMessage.sent_at.is_(None), OutboxMessage.not_before > db_now()
    )
    return [
        Job.state == JobState.QUEUED,
        Job.cancel_requested.is_(False),
        Job.attempt < Job.max_attempts,
        Job.id.not_in(held_back),
    ]


def _candidates(db: Session, settings: Settings, queue: str, tried: list[str]) -> list[_Candidate]:
    waiting = db.scalars(
        select(Job.team_id).where(Job.queue == queue, *_claimable()).distinct()
    ).all()
    if not waiting:
        return []
    running = _running_by_team(db, list(waiting))
    limits = _running_limits(db, settings, list(waiting))
    open_teams = [t for t in waiting if limits[t] is None or running.get(t, 0) < limits[t]]
    if not open_teams:
        return []
    load = (
        select(Job.team_id.label("team_id"), func.count().label("running"))
        .where(Job.state.in_(LEASED))
        .group_by(Job.team_id)
        .subquery()
    )
    rows = db.execute(
        select(Job.id, Job.team_id)
        .outerjoin(load, load.c.team_id == Job.team_id)
        .where(Job.queue == queue, Job.team_id.in_(open_teams), *_claimable())
        .where(Job.id.not_in(tried))
        .order_by(func.coalesce(load.c.running, 0), Job.created_at, Job.id)
        .limit(CANDIDATES)
    ).all()
    return [_Candidate(job, team, limits[team] is not None) for job, team in rows]


def _running_limits(db: Session, settings: Settings, team_ids: list[str]) -> dict[str, int | None]:
    """Each team's running-jobs limit, as limits_for gives it, in one query for all of
    them, not one a team: a claim's round trips grew with the teams waiting."""
    statement = select(TeamQuota.team_id, TeamQuota.max_running_jobs).where(
        TeamQuota.team_id.in_(team_ids), TeamQuota.max_running_jobs.is_not(None)
    )
    own: dict[str, int] = dict(db.execute(statement).all())  # type: ignore[arg-type]
    default = defaults(settings)["running_jobs"]
    return {team: own.get(team, default) for team in team_ids}


def _has_room(db: Session, settings: Settings, team_id: str) -> bool:
    """Under the team's lock: may one more of its jobs run? (Two workers claiming for the
    same team at once are serialised here, so neither slips past the quota.)"""
    lock_team(db, team_id)
    limit = limits_for(db, settings, team_id).running_jobs
    return limit is None or _running_by_team(db, [team_id]).get(team_id, 0) < limit


def wake_waiting(db: Session, settings: Settings, team_id: str) -> str | None:
    """A job of the team stopped running: if the team has a running-jobs quota and a job
    waiting with no message on its way, publish one for its oldest (the messages of a team
    at its quota were dropped at the claim). The job woken, or None."""
    if limits_for(db, settings, team_id).running_jobs is None:
        return None
    unsent = exists().where(OutboxMessage.job_id == Job.id, OutboxMessage.sent_at.is_(None))
    oldest = db.scalar(
        select(Job.id)
        .where(Job.team_id == team_id, *_claimable(), not_(unsent))
        .order_by(Job.created_at, Job.id)
        .limit(1)
    )
    if oldest is not None:
        db.add(OutboxMessage(job_id=oldest))
    return oldest


def wake_teams_of(db: Session, settings: Settings, job_ids: list[str]) -> list[str]:
    """`wake_waiting` for the team of each job that stopped running (the reaper's)."""
    teams = db.scalars(select(Job.team_id).where(Job.id.in_(job_ids)).distinct()).all()
    return [woken for team in teams if (woken := wake_waiting(db, settings, team))]
