"""What a finished job keeps: `DELETE /jobs/{id}` removes a terminal job and everything it
stored, and `prune_checkpoints` keeps only a finished job's best and last few checkpoints
(`TUNEQ_KEEP_CHECKPOINTS`).

Objects go before rows. A store that fails midway leaves the rows, which still name every
object that may be left, so the same call later finishes the work; rows first would leave
objects that nothing names. Every object of a job lives under `jobs/{job_id}/`.
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from tuneq.audit.service import Actor, record
from tuneq.db import transaction
from tuneq.errors import Conflict
from tuneq.jobs.models import Job, JobArtifact, JobCheckpoint
from tuneq.jobs.schemas import checkpoint_artifact_name
from tuneq.jobs.service import get_job
from tuneq.jobs.states import TERMINAL
from tuneq.storage import ObjectStore
from tuneq.teams.models import Team


def job_prefix(job_id: str) -> str:
    """The store prefix under which every object of the job lives."""
    return f"jobs/{job_id}/"


def delete_job(
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    team: Team,
    job_id: str,
    actor: Actor | None = None,
) -> str:
    """Delete a terminal job: its stored objects (adapter, checkpoints, diagnostics), then its
    row with its events, metrics, checkpoints and artifacts. 409 while it can still run."""
    with transaction(sessions) as db:
        job = get_job(db=db, team=team, job_id=job_id)
        if job.state not in TERMINAL:
            raise Conflict(
                f"job {job.id} is {job.state}; cancel it first, then delete it",
                param="job_id",
            )
    store.delete_prefix(job_prefix(job_id))
    with transaction(sessions) as db:
        job = db.get(Job, job_id)
        if job is not None:  # a concurrent delete may have gone first
            db.delete(job)  # its children go by ON DELETE CASCADE
            record(db, actor, "job.delete", job_id)
    return job_id


def prune_checkpoints(
    *, sessions: sessionmaker[Session], store: ObjectStore, job_id: str, keep_last: int
) -> list[int]:
    """Of a succeeded job's checkpoints keep the last `keep_last` and the best one (the step
    of its kept weights); delete the others' objects, then rows. The steps deleted."""
    with transaction(sessions) as db:
        job = db.get(Job, job_id)
        if job is None:
            return []
        checkpoints = list(db.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)))
        best = (job.result or {}).get("best_step")
        steps = sorted({c.step for c in checkpoints})
        kept = set(steps[len(steps) - keep_last :] if keep_last else ()) | {best}
        doomed = [c for c in checkpoints if c.step not in kept]
        artifacts = list(
            db.scalars(
                select(JobArtifact).where(
                    JobArtifact.job_id == job_id,
                    JobArtifact.name.in_([checkpoint_artifact_name(c.step) for c in doomed]),
                )
            )
        )
    for checkpoint in doomed:  # its files and its tarball live under its prefix
        store.delete_prefix(checkpoint.storage_prefix)
    for artifact in artifacts:
        store.delete(artifact.storage_key)
    with transaction(sessions) as db:
        db.execute(delete(JobArtifact).where(JobArtifact.id.in_([a.id for a in artifacts])))
        db.execute(delete(JobCheckpoint).where(JobCheckpoint.id.in_([c.id for c in doomed])))
    return sorted({c.step for c in doomed})
