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
from functools import cache, lru_cache
from itertools import groupby
from typing import Any

from sqlalchemy import (
    Integer,
    Select,
    String,
    bindparam,
    exists,
    func,
    literal,
    not_,
    select,
    union_all,
)
from sqlalchemy.orm import Session, aliased

from tuneq.db import db_now
from tuneq.jobs.lease import Claim, claim_job
from tuneq.jobs.models import Job, OutboxMessage
from tuneq.jobs.states import LEASED, JobState
from tuneq.quotas.models import TeamQuota
from tuneq.quotas.service import defaults, limits_for, lock_team
from tuneq.settings import Settings

CANDIDATES = 20  # read at a time, tried in order until one claim succeeds
ROUNDS = 5  # reads at most: workers claiming at once may have taken the first candidates
TEAMS_A_READ = 32  # teams whose oldest jobs one query reads (a UNION ALL of one a team)


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
            if candidate.limited:  # the team's claims one at a time, before its job's row:
                lock_team(db, candidate.team_id)  # so its oldest jobs take its free slots
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


def _claimable(job: type[Job] = Job) -> list[Any]:
    """A queued job a worker may start now: not cancelled, attempts left, and not held
    back by a hand-back's delay (its outbox row not yet due). `state = 'queued'` is the
    predicate of ix_jobs_queued, the partial index the claim reads (migration 0006)."""
    # The few held back, read once: a correlated NOT EXISTS with the clock in it is not
    # made a join, and probed the outbox once for every queued job of every claim.
    # 'queued' is written in the statement, not bound: a prepared statement's generic plan
    # (psycopg prepares one after 5 runs) can then use ix_jobs_queued, and the claim's
    # statements are no longer planned at every run.
    held_back = select(OutboxMessage.job_id).where(
        OutboxMessage.sent_at.is_(None), OutboxMessage.not_before > db_now()
    )
    return [
        job.state == literal(JobState.QUEUED.value, String, literal_execute=True),
        job.cancel_requested.is_(False),
        job.attempt < job.max_attempts,
        job.id.not_in(held_back),
    ]


def _candidates(db: Session, settings: Settings, queue: str, tried: list[str]) -> list[_Candidate]:
    """The CANDIDATES jobs due first: of the open teams with the least running work first,
    oldest first (created_at, id) among teams with as much. Read a load at a time, each
    team's oldest from ix_jobs_queued: neither the whole queue read nor sorted."""
    waiting = _waiting_teams(db, queue)
    if not waiting:
        return []
    running = _running_by_team(db, waiting)
    limits = _running_limits(db, settings, waiting)
    open_teams = [t for t in waiting if limits[t] is None or running.get(t, 0) < limits[t]]
    load = lambda team: running.get(team, 0)  # noqa: E731
    found: list[tuple[str, str]] = []
    for _, teams in groupby(sorted(open_teams, key=load), key=load):
        found += _oldest(db, queue, list(teams), tried, CANDIDATES - len(found))
        if len(found) == CANDIDATES:
            break
    return [_Candidate(job, team, limits[team] is not None) for job, team in found]


def _waiting_teams(db: Session, queue: str) -> list[str]:
    """The teams with a claimable job on the queue, one index probe a team (a loose scan of
    ix_jobs_queued: each step the least team_id after the last), not a read of the queue."""
    return list(db.scalars(_waiting_statement(), {"queue": queue}))


def _oldest(
    db: Session, queue: str, teams: list[str], tried: list[str], count: int
) -> list[tuple[str, str]]:
    """The `count` oldest claimable jobs (created_at, id) of these teams, not yet tried:
    each team's first `count` in its ix_jobs_queued order, merged (TEAMS_A_READ a query).
    The tried are left out here, of `count` + len(tried) read: in the statement, their ids
    made its text differ at every round, and a statement prepared once could not serve."""
    rows: list[Any] = []
    for start in range(0, len(teams), TEAMS_A_READ):
        chunk = teams[start : start + TEAMS_A_READ]
        values = {f"team_{n}": team for n, team in enumerate(chunk)}
        values |= {"queue": queue, "count": count + len(tried)}
        rows += db.execute(_oldest_statement(len(chunk)), values).all()
    rows.sort(key=lambda row: (row.created_at, row.id))  # several reads: merged here
    skip = set(tried)
    return [(row.id, row.team_id) for row in rows if row.id not in skip][:count]


# The two statements are built once (for each number of teams) with bound parameters:
# building the expressions anew took more of a claim's CPU than the database's work.


@cache
def _waiting_statement() -> Select[tuple[str]]:
    queue = bindparam("queue", type_=String)
    first = select(func.min(Job.team_id).label("team_id")).where(Job.queue == queue, *_claimable())
    teams = first.cte("waiting", recursive=True)
    job = aliased(Job)
    after = select(func.min(job.team_id)).where(
        job.queue == queue, job.team_id > teams.c.team_id, *_claimable(job)
    )
    teams = teams.union_all(select(after.scalar_subquery()).where(teams.c.team_id.is_not(None)))
    return select(teams.c.team_id).where(teams.c.team_id.is_not(None))


@lru_cache(maxsize=TEAMS_A_READ)
def _oldest_statement(teams: int) -> Select[tuple[str, str, Any]]:
    """A UNION ALL of one ORDER BY created_at, id LIMIT :count a team (:team_0 ...), which
    PostgreSQL merges (Merge Append) from as many scans of ix_jobs_queued."""
    queue, count = bindparam("queue", type_=String), bindparam("count", type_=Integer)
    each = [
        select(Job.id, Job.team_id, Job.created_at)
        .where(Job.queue == queue, Job.team_id == bindparam(f"team_{n}", type_=String))
        .where(*_claimable())
        .order_by(Job.created_at, Job.id)
        .limit(count)
        .subquery()
        for n in range(teams)
    ]
    merged = union_all(*(select(oldest) for oldest in each)).subquery()
    return select(merged).order_by(merged.c.created_at, merged.c.id).limit(count)


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
    """Under the team's lock (taken by the caller before the job's row, so that two
    workers claiming for the same team at once are serialised and neither slips past the
    quota, nor takes a younger job while an older one waits): may one more of its jobs run?"""
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
