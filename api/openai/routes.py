"""The OpenAI-compatible routes under `/openai/v1`: `files` and `fine_tuning/jobs`.

Thin, as the native routes are: each reads OpenAI's request, calls the same use case as its
native twin (tuneq.files.service, tuneq.jobs.service, api.job_reads for the polled reads),
and shows the answer as OpenAI's object (api.openai.objects). Errors are the domain's,
rendered in OpenAI's shape by api.openai.errors.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Header, Query, Request
from starlette.responses import StreamingResponse

from api.deps import (
    CeleryDep,
    DbDep,
    RegistryDep,
    SessionsDep,
    SettingsDep,
    StoreDep,
    TeamDep,
)
from api.job_reads import JobQuery, JobReads
from api.openai.objects import (
    CHECKPOINT_ID_PREFIX,
    EVENT_ID_PREFIX,
    FileDeleted,
    FileObject,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    page,
)
from api.openai.requests import JobCreate, renamed, translate
from api.routes.files import UPLOAD_BODY, download_file, receive_upload
from api.routes.jobs import metadata_filter
from tuneq.errors import NotFound, TuneqError, field_error
from tuneq.files import service as files
from tuneq.files.schemas import FilePublic
from tuneq.jobs import service as jobs
from tuneq.jobs.schemas import CheckpointPublic, EventPublic, JobPublic
from tuneq.teams.models import Team

PREFIX = "/openai/v1"
router = APIRouter(prefix=PREFIX, tags=["openai"])

Limit = Annotated[int, Query(ge=1, le=100)]
IdempotencyKey = Annotated[str | None, Header()]


# ----------------------------------------------------------------------------- files


@router.post("/files", response_model=FileObject, openapi_extra=UPLOAD_BODY)
async def create_file(
    request: Request,
    team: TeamDep,
    sessions: SessionsDep,
    store: StoreDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> FileObject:
    native = await receive_upload(
        request,
        team=team,
        sessions=sessions,
        store=store,
        settings=settings,
        idempotency_key=idempotency_key,  # the same key as `POST /files`'s
    )
    return FileObject.of(native)


@router.get("/files")
def list_files(
    team: TeamDep,
    db: DbDep,
    after: str | None = None,
    limit: Limit = 100,
    purpose: str | None = None,
    order: str = "desc",
) -> dict[str, Any]:
    if order != "desc":
        raise field_error("order", "files are listed newest first only: 'desc'")
    if purpose is not None and purpose not in files.PURPOSES:
        return page([], has_more=False)  # tuneq keeps fine-tuning data only
    rows, has_more = files.list_files(db=db, team=team, limit=limit, after=after)
    return page([_file(row) for row in rows], has_more=has_more)


@router.get("/files/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, team: TeamDep, db: DbDep) -> FileObject:
    return _file(files.get_file(db=db, team=team, file_id=file_id))


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, team: TeamDep, db: DbDep, store: StoreDep) -> FileDeleted:
    file = files.delete_file(db=db, store=store, team=team, file_id=file_id)
    return FileDeleted(id=file.id)


# A file's content is the native download itself, served on the facade's path too.
router.add_api_route(
    "/files/{file_id}/content",
    download_file,
    methods=["GET"],
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 307: {}},
)


def _file(row: Any) -> FileObject:
    return FileObject.of(FilePublic.of(row).model_dump(mode="json"))


# ----------------------------------------------------------------------------- jobs


@router.post("/fine_tuning/jobs", response_model=FineTuningJob)
def create_job(
    body: JobCreate,
    team: TeamDep,
    sessions: SessionsDep,
    store: StoreDep,
    settings: SettingsDep,
    registry: RegistryDep,
    celery: CeleryDep,
    background: BackgroundTasks,
    idempotency_key: IdempotencyKey = None,
) -> FineTuningJob:
    # A plain def, as the native route: planning tokenizes the data off the event loop.
    translation = translate(body)
    try:
        submitted = jobs.submit_job(
            sessions=sessions,
            store=store,
            settings=settings,
            registry=registry,
            broker=celery,
            team=team,
            body=translation.body,
            idempotency_key=idempotency_key,
            defer=background.add_task,
        )
    except TuneqError as err:
        raise renamed(err, translation) from None
    return _job(submitted.body, team)


@router.get("/fine_tuning/jobs")
async def list_jobs(
    request: Request, team: TeamDep, after: str | None = None, limit: Limit = 20
) -> dict[str, Any]:
    query = JobQuery(team.id, limit, after, metadata=metadata_filter(request))
    job_reads: JobReads = request.app.state.job_reads
    native = json.loads(await job_reads.page(query))
    return page([_job(job, team) for job in native["data"]], has_more=native["has_more"])


@router.get("/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
async def retrieve_job(job_id: str, request: Request, team: TeamDep) -> FineTuningJob:
    # What clients poll: the native road's reader (api.job_reads), then OpenAI's shape.
    job_reads: JobReads = request.app.state.job_reads
    document = await job_reads.get(team_id=team.id, job_id=job_id)
    if document is None:  # another team's job does not exist for you
        raise NotFound(f"no job {job_id!r}", param="job_id")
    return _job(json.loads(document), team)


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(job_id: str, team: TeamDep, sessions: SessionsDep) -> FineTuningJob:
    return _job(jobs.cancel_job(sessions=sessions, team=team, job_id=job_id), team)


@router.post("/fine_tuning/jobs/{job_id}/pause", response_model=FineTuningJob)
def pause_job(job_id: str, team: TeamDep, sessions: SessionsDep) -> FineTuningJob:
    return _job(jobs.pause_job(sessions=sessions, team=team, job_id=job_id), team)


@router.post("/fine_tuning/jobs/{job_id}/resume", response_model=FineTuningJob)
def resume_job(
    job_id: str,
    team: TeamDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    celery: CeleryDep,
    background: BackgroundTasks,
) -> FineTuningJob:
    resumed = jobs.resume_job(
        sessions=sessions,
        settings=settings,
        broker=celery,
        team=team,
        job_id=job_id,
        defer=background.add_task,
    )
    return _job(resumed, team)


@router.get("/fine_tuning/jobs/{job_id}/events")
def list_events(
    job_id: str, team: TeamDep, db: DbDep, after: str | None = None, limit: Limit = 20
) -> dict[str, Any]:
    job = jobs.get_job(db=db, team=team, job_id=job_id)
    before = _cursor(after, EVENT_ID_PREFIX)
    events, has_more = jobs.list_events(
        db=db, job=job, after=before, limit=limit, newest_first=True
    )
    native = (EventPublic.of(event).model_dump(mode="json") for event in events)
    return page([FineTuningJobEvent.of(event) for event in native], has_more=has_more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(
    job_id: str, team: TeamDep, db: DbDep, after: str | None = None, limit: Limit = 10
) -> dict[str, Any]:
    """Newest first. A job keeps few checkpoints: the page is cut from the whole list."""
    job = jobs.get_job(db=db, team=team, job_id=job_id)
    rows = jobs.list_checkpoints(db=db, job=job)[::-1]
    if after is not None:
        before = _cursor(after, CHECKPOINT_ID_PREFIX)
        position = next((n for n, row in enumerate(rows) if row.id == before), None)
        rows = [] if position is None else rows[position + 1 :]  # an id not of this job: none
    shown = rows[:limit]
    train = jobs.train_metrics_at(db=db, job=job, steps=[row.step for row in shown])
    document = JobPublic.of(job).model_dump(mode="json")
    checkpoints = [
        FineTuningJobCheckpoint.of(
            row.id,
            CheckpointPublic.of(row).model_dump(mode="json"),
            job=document,
            organization_id=team.id,
            train_loss=train.get(row.step, {}).get("train_loss"),
        )
        for row in shown
    ]
    return page(checkpoints, has_more=len(rows) > limit)


def _job(native: Any, team: Team) -> FineTuningJob:
    """A native job (its JSON document, or JobPublic) as OpenAI's job object."""
    document = native if isinstance(native, dict) else native.model_dump(mode="json")
    return FineTuningJob.of(document, organization_id=team.id)


def _cursor(after: str | None, prefix: str) -> int | None:
    """The row id in an `after` cursor such as `ftevent-42`."""
    if after is None:
        return None
    number = after.removeprefix(prefix)
    if not number.isdigit():
        raise field_error("after", f"not an id this list gave: expected {prefix}<number>")
    return int(number)
