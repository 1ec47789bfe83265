"""Jobs as every road in sees them: submit (or estimate), read, list, cancel, pause, resume.

A job is validated completely when it is submitted (tuneq.jobs.planning: spec, model,
files, token counts), so a job that exists is one that can run; it is created `queued` with
its outbox row in the same transaction. The use cases that change a job own their
transactions and publish after the commit, so the native routes, a facade or a CLI get the
same idempotency, outbox and errors; the reads take the caller's session.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from peft_engine.models import ModelRegistry
from tuneq import faults
from tuneq.audit.service import Action, Actor, record
from tuneq.db import db_now, transaction
from tuneq.errors import Conflict, DiagnosticsUnavailable, JobNotFinished, NotFound
from tuneq.idempotency.service import idempotent, request_hash
from tuneq.ids import new_id
from tuneq.jobs.models import Job, JobArtifact, JobCheckpoint, JobEvent, JobMetric, OutboxMessage
from tuneq.jobs.planning import Plan, estimate_of, plan_job, resolved_view
from tuneq.jobs.schemas import DIAGNOSTICS_ARTIFACT, JobPublic
from tuneq.jobs.states import JobState, move_to
from tuneq.queue import relay_now
from tuneq.quotas import service as quotas
from tuneq.settings import Settings
from tuneq.storage import ObjectStore
from tuneq.teams.models import Team
from tuneq.webhooks.schemas import JOB_CANCELLED
from tuneq.webhooks.service import enqueue_job_event

SUBMIT = "POST /jobs"  # the use case's name under an Idempotency-Key
# How a use case publishes after its commit: runs a function with its arguments once the
# caller has answered (FastAPI's BackgroundTasks.add_task), or at once for a caller that can.
Defer = Callable[..., Any]


@dataclass(frozen=True)
class Submission:
    """What a submission answers, as JSON: the job created (201), the answer first given
    under the same Idempotency-Key, or a dry run's estimate (200)."""

    status: int
    body: dict[str, Any]


def submit_job(
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    settings: Settings,
    registry: ModelRegistry,
    broker: Celery,
    team: Team,
    body: dict[str, Any],
    dry_run: bool = False,
    idempotency_key: str | None = None,
    defer: Defer,
    actor: Actor | None = None,
) -> Submission:
    """Validate and estimate a job spec, then (unless a dry run) create the job under the
    Idempotency-Key and publish it after the commit."""

    # Sessions are opened one after another, never nested: on SQLite a write transaction
    # holds the database lock, and a nested one would wait for its own parent.
    def plan() -> Plan:
        with sessions() as db:
            return plan_job(
                db=db, store=store, settings=settings, registry=registry, team=team, body=body
            )

    if dry_run:
        return Submission(200, estimate_of(plan()).model_dump(mode="json"))
    with idempotent(
        sessions,
        team_id=team.id,
        key=idempotency_key,
        method_path=SUBMIT,
        fingerprint=request_hash(SUBMIT, json.dumps(body, sort_keys=True)),
    ) as request:
        if request.replay is not None:
            return Submission(request.replay.status, request.replay.body)
        planned = plan()
        with transaction(sessions) as db:
            quotas.check_submit(db, settings, team)  # under the team's lock: no two slip past
            job = _create_job(db=db, settings=settings, team=team, plan=planned)
            record(db, actor, "job.create", job.id)
            public = JobPublic.of(job).model_dump(mode="json")
            request.record(db, 201, public)
    faults.exit_point("exit_after_commit")  # a crash here leaves the publishing to the relay
    defer(relay_now, sessions, broker)
    return Submission(201, public)


def _create_job(*, db: Session, settings: Settings, team: Team, plan: Plan) -> Job:
    spec = plan.spec
    job = Job(
        id=new_id("job"),
        team_id=team.id,
        state=JobState.QUEUED,
        model=spec.model,
        queue=plan.queue,
        task=spec.task,
        training_file_id=plan.training_file.id,
        validation_file_id=plan.validation_file.id if plan.validation_file else None,
        # What the user asked, as asked: defaults stay defaults when the worker parses it
        # (a default fitted to the model, such as max_seq_length, is not a user's choice).
        spec=spec.model_dump(mode="json", exclude_unset=True),
        resolved=resolved_view(plan),
        estimate=plan.estimate.as_dict(),
        suffix=spec.suffix,
        metadata_=dict(spec.metadata),
        max_attempts=settings.max_attempts,
    )
    db.add(job)
    db.flush()  # the job row before the rows that point at it
    db.add(OutboxMessage(job_id=job.id))
    unit = "images" if spec.task == "image_classification" else "tokens"
    db.add(
        JobEvent(
            job_id=job.id,
            type="message",
            level="info",
            message=f"job created: {plan.estimate.trained_tokens} {unit} to train in "
            f"{plan.estimate.spec.hyperparameters.total_steps} steps",
            data=plan.estimate.as_dict(),
        )
    )
    db.flush()
    return job


def get_job(*, db: Session, team: Team, job_id: str) -> Job:
    job = db.get(Job, job_id)
    if job is None or job.team_id != team.id:  # another team's job does not exist for you
        raise NotFound(f"no job {job_id!r}", param="job_id")
    return job


def cancel_job(
    *, sessions: sessionmaker[Session], team: Team, job_id: str, actor: Actor | None = None
) -> JobPublic:
    """A queued or paused job is cancelled at once; a running one is asked to stop."""
    return _steer(sessions, team, job_id, _cancel, (actor, "job.cancel"))


def pause_job(
    *, sessions: sessionmaker[Session], team: Team, job_id: str, actor: Actor | None = None
) -> JobPublic:
    """A queued job is paused at once; a running one stops at its next heartbeat."""
    return _steer(sessions, team, job_id, _pause, (actor, "job.pause"))


def resume_job(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    broker: Celery,
    team: Team,
    job_id: str,
    defer: Defer,
    actor: Actor | None = None,
) -> JobPublic:
    """A paused job is queued again, and published after the commit."""
    resume = partial(_resume, settings=settings)
    resumed = _steer(sessions, team, job_id, resume, (actor, "job.resume"))
    defer(relay_now, sessions, broker)
    return resumed


def _steer(
    sessions: sessionmaker[Session],
    team: Team,
    job_id: str,
    change: Callable[[Session, Job], None],
    audit: tuple[Actor | None, Action],
) -> JobPublic:
    """One transaction: find the team's job, change it, record who did, and show it as it
    is now."""
    with transaction(sessions) as db:
        job = get_job(db=db, team=team, job_id=job_id)
        change(db, job)
        record(db, *audit, job.id)
        db.flush()
        db.refresh(job)
        return JobPublic.of(job)


def _cancel(db: Session, job: Job) -> None:
    if job.state in (JobState.QUEUED, JobState.PAUSED):
        _transition(db, job, JobState.CANCELLED, finished=True, cancel_requested=True)
        _event(db, job, "cancelled before it ran" if job.attempt == 0 else "cancelled")
        enqueue_job_event(db, job_id=job.id, event_type=JOB_CANCELLED)
    elif job.state == JobState.RUNNING:
        _transition(db, job, JobState.CANCELLING, cancel_requested=True)
        _event(db, job, "cancel requested; the worker stops within two heartbeats")
    elif job.state != JobState.CANCELLING:
        raise Conflict(f"job {job.id} is {job.state}; it cannot be cancelled", param="job_id")


def _pause(db: Session, job: Job) -> None:
    if job.state == JobState.QUEUED:
        _transition(db, job, JobState.PAUSED)
        _event(db, job, "paused")
    elif job.state == JobState.RUNNING:
        db.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == JobState.RUNNING)
            .values(pause_requested=True)
        )
        _event(db, job, "pause requested; the worker stops at its next heartbeat")
    elif job.state != JobState.PAUSED:
        raise Conflict(f"job {job.id} is {job.state}; it cannot be paused", param="job_id")


def _resume(db: Session, job: Job, *, settings: Settings) -> None:
    if job.state != JobState.PAUSED:
        raise Conflict(f"job {job.id} is {job.state}; only a paused job resumes", param="job_id")
    # Pauses are not failures: a resumed job gets a fresh budget of attempts.
    _transition(
        db,
        job,
        JobState.QUEUED,
        pause_requested=False,
        max_attempts=job.attempt + settings.max_attempts,
    )
    db.add(OutboxMessage(job_id=job.id))
    _event(db, job, "resumed; queued again")


def _transition(
    db: Session, job: Job, target: JobState, *, finished: bool = False, **values: Any
) -> None:
    """Move the job only if nobody moved it meanwhile (a worker may be writing too)."""
    if finished:
        values["finished_at"] = db_now()
    result = db.execute(move_to(target, Job.id == job.id, Job.state == job.state).values(**values))
    if (result.rowcount or 0) != 1:
        raise Conflict(f"job {job.id} changed state meanwhile; retry", param="job_id")


def _event(db: Session, job: Job, message: str, level: str = "info") -> None:
    db.add(JobEvent(job_id=job.id, type="message", level=level, message=message))


def list_events(
    *, db: Session, job: Job, after: int | None, limit: int, newest_first: bool = False
) -> tuple[list[JobEvent], bool]:
    """A page of the job's events after the event `after` in the page's order: oldest
    first (the native order), or newest first (OpenAI's), and whether more follow."""
    query = select(JobEvent).where(JobEvent.job_id == job.id)
    if after is not None:
        query = query.where(JobEvent.id < after if newest_first else JobEvent.id > after)
    order = JobEvent.id.desc() if newest_first else JobEvent.id
    rows = list(db.scalars(query.order_by(order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def metrics_series(*, db: Session, job: Job) -> dict[str, Any]:
    """Per-step training metrics and per-evaluation metrics, each as a list of points.

    A step retried by a later attempt (after a lost worker) appears once: the later value.
    """
    rows = db.scalars(
        select(JobMetric).where(JobMetric.job_id == job.id).order_by(JobMetric.id)
    ).all()
    train: dict[int, dict[str, Any]] = {}
    evaluation: dict[int, dict[str, Any]] = {}
    for row in rows:
        target = train if row.kind == "train" else evaluation
        target[row.step] = {"step": row.step, **row.values}
    return {
        "object": "job.metrics",
        "job_id": job.id,
        "train": [train[s] for s in sorted(train)],
        "eval": [evaluation[s] for s in sorted(evaluation)],
        **_outcome(job.result),
    }


def _outcome(result: dict[str, Any] | None) -> dict[str, Any]:
    """What a finished job's result says of the weights its output holds: `kept` (their
    metrics: on the whole validation set, else the best periodic evaluation's), `best_step`,
    and the task's `report`: classification's labels, per-class precision/recall/F1 and
    confusion matrix (rows the gold label, columns the predicted one); NER's per type."""
    if not result:
        return {}
    metrics = result.get("metrics") or {}
    outcome: dict[str, Any] = {
        "kept": metrics.get("kept") or metrics.get("best") or None,
        "best_step": result.get("best_step"),
    }
    report = result.get("report")
    if isinstance(report, dict) and report:
        outcome["report"] = report
    return outcome


def train_metrics_at(*, db: Session, job: Job, steps: Iterable[int]) -> dict[int, dict[str, Any]]:
    """The training metrics of the given steps (the latest attempt's where steps repeat)."""
    rows = db.scalars(
        select(JobMetric)
        .where(JobMetric.job_id == job.id, JobMetric.kind == "train", JobMetric.step.in_(steps))
        .order_by(JobMetric.id)
    )
    return {row.step: row.values for row in rows}


def list_checkpoints(*, db: Session, job: Job) -> list[JobCheckpoint]:
    return list(
        db.scalars(
            select(JobCheckpoint).where(JobCheckpoint.job_id == job.id).order_by(JobCheckpoint.step)
        )
    )


def list_artifacts(*, db: Session, job: Job) -> list[JobArtifact]:
    return list(
        db.scalars(
            select(JobArtifact)
            .where(JobArtifact.job_id == job.id)
            .order_by(JobArtifact.kind, JobArtifact.step)
        )
    )


def get_artifact(*, db: Session, job: Job, name: str) -> JobArtifact:
    artifact = newest_artifact(db=db, job=job, name=name)
    if artifact is None:
        raise NotFound(f"job {job.id} has no artifact {name!r}", param="name")
    return artifact


def newest_artifact(*, db: Session, job: Job, name: str) -> JobArtifact | None:
    return db.scalar(  # a later attempt may have re-made it: the newest wins
        select(JobArtifact)
        .where(JobArtifact.job_id == job.id, JobArtifact.name == name)
        .order_by(JobArtifact.id.desc())
        .limit(1)
    )


def read_diagnostics(*, db: Session, store: ObjectStore, job: Job) -> dict[str, Any]:
    """The job's per-example diagnostics (diagnostics.jsonl, a few dozen rows), parsed."""
    if job.result is None:
        raise JobNotFinished(
            f"job {job.id} is {job.state}; its diagnostics come with its result", param="job_id"
        )
    artifact = newest_artifact(db=db, job=job, name=DIAGNOSTICS_ARTIFACT)
    if artifact is None:
        raise DiagnosticsUnavailable(
            f"job {job.id} ran before per-example diagnostics were recorded: its output has no "
            f"{DIAGNOSTICS_ARTIFACT} (jobs run now record them)",
            param="job_id",
        )
    text = b"".join(store.open_stream(artifact.storage_key)).decode()
    return {
        "object": "job.diagnostics",
        "job_id": job.id,
        "summary": job.result.get("diagnostics"),
        "data": [json.loads(line) for line in text.splitlines() if line],
    }
