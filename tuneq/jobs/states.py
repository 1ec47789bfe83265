"""The job state machine (DESIGN §3): which state may follow which.

    queued ──claim──▶ running ──▶ succeeded | failed
      │                 │ cancel         │ pause
      ▼                 ▼                ▼
    cancelled ◀── cancelling           paused ──resume──▶ queued

A running job whose lease expires goes back to queued (or to failed/worker_lost when its
attempts are spent). Jobs are validated inside `POST /jobs`, so they are born queued.
"""

from __future__ import annotations

from enum import StrEnum


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
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.CANCELLING,
            JobState.PAUSED,
            JobState.QUEUED,  # lease expired, another attempt
        }
    ),
    JobState.CANCELLING: frozenset({JobState.CANCELLED, JobState.FAILED, JobState.SUCCEEDED}),
    JobState.PAUSED: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def can_move(source: JobState, target: JobState) -> bool:
    return target in TRANSITIONS[source]
