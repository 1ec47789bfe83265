"""The job state machine (DESIGN §3): which state may follow which, and the one UPDATE that
moves a job, so that no status is ever written outside the table.

    queued ──claim──▶ running ──▶ succeeded | failed
      │                 │ cancel         │ pause
      ▼                 ▼                ▼
    cancelled ◀── cancelling           paused ──resume──▶ queued

A running job whose lease expires is claimed again by another worker, or goes back to
queued (or to failed/worker_lost when its attempts are spent). Jobs are validated inside
`POST /jobs`, so they are born queued.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import Update, update

from tuneq.jobs.models import Job


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
# States in which a worker holds (or held) a lease on the job.
LEASED = frozenset({JobState.RUNNING, JobState.CANCELLING})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.PAUSED}),
    JobState.RUNNING: frozenset(
        {
            JobState.RUNNING,  # lease expired, claimed by another worker
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.CANCELLING,
            JobState.PAUSED,
            JobState.QUEUED,  # lease expired or worker shutting down, another attempt
        }
    ),
    JobState.CANCELLING: frozenset({JobState.CANCELLED, JobState.FAILED, JobState.SUCCEEDED}),
    JobState.PAUSED: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def sources_of(target: JobState) -> frozenset[JobState]:
    """The states from which TRANSITIONS lets a job move to `target`."""
    return frozenset(source for source, targets in TRANSITIONS.items() if target in targets)


def move_to(target: JobState, *where: Any) -> Update:
    """The UPDATE that moves the jobs matching `where` to `target`, from a legal state only.

    Every status change is this statement (callers add values, and RETURNING where they
    need it): a job in any other state matches no row, so an illegal move writes nothing.
    """
    sources = sorted(sources_of(target))  # sorted: the same SQL text in every process
    return update(Job).where(Job.state.in_(sources), *where).values(state=target)
