"""Jobs as the API sees them: create (or estimate), read, list, cancel, pause, resume.

A job is validated completely inside `POST /jobs` (spec, model, files, token counts), so
a job that exists is one that can run; it is created `queued` with its outbox row in the
same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from peft_engine.errors import DataError, ModelNotFoundError, SpecError, UserError
from peft_engine.estimate import Estimate, estimate_job
from peft_engine.models import ModelRegistry
from peft_engine.prepare import DataPaths
from peft_engine.spec import JobSpec, parse_spec
from tuneq.db import db_now
from tuneq.errors import (
    Conflict,
    ErrorItem,
    InvalidFile,
    InvalidHyperparameters,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    TuneqError,
)
from tuneq.files.models import File
from tuneq.files.service import get_file, local_copy
from tuneq.ids import new_id
from tuneq.jobs.models import Job, JobArtifact, JobCheckpoint, JobEvent, JobMetric, OutboxMessage
from tuneq.jobs.states import TERMINAL, JobState
from tuneq.settings import Settings
from tuneq.storage import ObjectStore
from tuneq.teams.models import Team


@dataclass(frozen=True)
class Plan:
    """A job spec checked against the registry and its files, with what it will cost."""

    spec: JobSpec
    estimate: Estimate
    training_file: File
    validation_file: File | None
    queue: str


def as_tuneq_error(err: UserError) -> TuneqError:
    """The engine's user errors, as the API reports them."""
    if isinstance(err, DataError):
        items = [ErrorItem(e.message, field=e.field, line=e.line) for e in err.errors]
        if not items:  # a problem with the file as a whole: name the field that holds it
            items = [ErrorItem(err.message, field=err.param)]
        return InvalidFile(
            err.message, errors=items, param=err.param, extra={"total_errors": err.total_errors}
        )
    field_item = [ErrorItem(err.message, field=err.param)] if err.param else []
    if isinstance(err, ModelNotFoundError):
        return ModelNotFound(str(err), errors=field_item, param=err.param)
    if isinstance(err, SpecError) and (err.param or "").startswith("hyperparameters"):
        return InvalidHyperparameters(str(err), errors=field_item, param=err.param)
    return InvalidRequest(str(err), errors=field_item, param=err.param)


def plan_job(
    *,
    db: Session,
    store: ObjectStore,
    settings: Settings,
    registry: ModelRegistry,
    team: Team,
    body: dict[str, Any],
) -> Plan:
    try:
        spec = parse_spec(body)
        if spec.training_file is None:
            raise SpecError("a training file id is required", param="training_file")
        training = _team_file(db, team, spec.training_file, "training_file")
        validation = (
            _team_file(db, team, spec.validation_file, "validation_file")
            if spec.validation_file
            else None
        )
        cache = settings.resolved_work_dir
        data = DataPaths(
            local_copy(store, training, cache),
            local_copy(store, validation, cache) if validation else None,
        )
        estimate = estimate_job(
            spec,
            data,
            registry=registry,
            cache_dir=settings.resolved_cache_dir,
            tokens_per_second=settings.estimated_tokens_per_second,
        )
    except UserError as err:
        raise as_tuneq_error(err) from None
    return Plan(spec, estimate, training, validation, registry.get(spec.model).queue)


def _team_file(db: Session, team: Team, file_id: str, param: str) -> File:
    try:
        return get_file(db=db, team=team, file_id=file_id)
    except NotFound:
        raise InvalidRequest(
            f"no file {file_id!r}",
            errors=[ErrorItem(f"no file {file_id!r}", field=param)],
            param=param,
        ) from None


def resolved_view(plan: Plan) -> dict[str, Any]:
    dumped = plan.estimate.spec.model_dump(mode="json")
    return {"method": dumped["method"], "hyperparameters": dumped["hyperparameters"]}


def create_job(*, db: Session, settings: Settings, team: Team, plan: Plan) -> Job:
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
    db.add(
        JobEvent(
            job_id=job.id,
            type="message",
            level="info",
            message=f"job created: {plan.estimate.trained_tokens} tokens to train in "
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


def cancel_job(*, db: Session, team: Team, job_id: str) -> Job:
    """A queued or paused job is cancelled at once; a running one is asked to stop."""
    job = get_job(db=db, team=team, job_id=job_id)
    if job.state in (JobState.QUEUED, JobState.PAUSED):
        _transition(db, job, JobState.CANCELLED, finished=True, cancel_requested=True)
        _event(db, job, "cancelled before it ran" if job.attempt == 0 else "cancelled")
    elif job.state == JobState.RUNNING:
        _transition(db, job, JobState.CANCELLING, cancel_requested=True)
        _event(db, job, "cancel requested; the worker stops within two heartbeats")
    elif job.state != JobState.CANCELLING:
        raise Conflict(f"job {job.id} is {job.state}; it cannot be cancelled", param="job_id")
    return _reloaded(db, job)


def pause_job(*, db: Session, team: Team, job_id: str) -> Job:
    job = get_job(db=db, team=team, job_id=job_id)
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
    return _reloaded(db, job)


def resume_job(*, db: Session, settings: Settings, team: Team, job_id: str) -> Job:
    job = get_job(db=db, team=team, job_id=job_id)
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
    return _reloaded(db, job)


def _transition(
    db: Session, job: Job, target: JobState, *, finished: bool = False, **values: Any
) -> None:
    """Move the job only if nobody moved it meanwhile (a worker may be writing too)."""
    if finished:
        values["finished_at"] = db_now()
    result = db.execute(
        update(Job).where(Job.id == job.id, Job.state == job.state).values(state=target, **values)
    )
    if (result.rowcount or 0) != 1:
        raise Conflict(f"job {job.id} changed state meanwhile; retry", param="job_id")


def _event(db: Session, job: Job, message: str, level: str = "info") -> None:
    db.add(JobEvent(job_id=job.id, type="message", level=level, message=message))


def _reloaded(db: Session, job: Job) -> Job:
    db.flush()
    db.refresh(job)
    return job


def list_events(
    *, db: Session, job: Job, after: int | None, limit: int
) -> tuple[list[JobEvent], bool]:
    query = select(JobEvent).where(JobEvent.job_id == job.id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    rows = list(db.scalars(query.order_by(JobEvent.id).limit(limit + 1)))
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
    }


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
    artifact = db.scalar(  # a later attempt may have re-made it: the newest wins
        select(JobArtifact)
        .where(JobArtifact.job_id == job.id, JobArtifact.name == name)
        .order_by(JobArtifact.id.desc())
        .limit(1)
    )
    if artifact is None:
        raise NotFound(f"job {job.id} has no artifact {name!r}", param="name")
    return artifact


def is_terminal(job: Job) -> bool:
    return JobState(job.state) in TERMINAL
