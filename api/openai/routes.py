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
    CallerDep,
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
from api.openapi_docs import openai_responses
from api.routes.files import UPLOAD_BODY, UPLOAD_REFUSALS, download_file, receive_upload
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
NO_FILE = (404, "no such file (another team's file does not exist for you)")
NO_JOB = (404, "no such job (another team's job does not exist for you)")
# The cursors `after` takes: an id as the list gives it, or its number (see _cursor).
CURSOR_DIGITS = 18  # any such number is a row id (tuneq.db.MAX_ROW_ID has 19 digits)
EVENT_CURSOR = Query(
    json_schema_extra={"pattern": f"^({EVENT_ID_PREFIX})?[0-9]{{1,{CURSOR_DIGITS}}}$"}
)
CHECKPOINT_CURSOR = Query(
    json_schema_extra={"pattern": f"^({CHECKPOINT_ID_PREFIX})?[0-9]{{1,{CURSOR_DIGITS}}}$"}
)


# ----------------------------------------------------------------------------- files


@router.post(
    "/files",
    response_model=FileObject,
    openapi_extra=UPLOAD_BODY,
    responses=openai_responses(*[(400 if s == 422 else s, why) for s, why in UPLOAD_REFUSALS]),
)
async def create_file(
    request: Request,
    caller: CallerDep,
    sessions: SessionsDep,
    store: StoreDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> FileObject:
    native = await receive_upload(
        request,
        caller=caller,
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
    order: Annotated[str, Query(json_schema_extra={"enum": ["desc"]})] = "desc",
) -> dict[str, Any]:
    if order != "desc":
        raise field_error("order", "files are listed newest first only: 'desc'")
    if purpose is not None and purpose not in files.PURPOSES:
        return page([], has_more=False)  # tuneq keeps fine-tuning data only
    rows, has_more = files.list_files(db=db, team=team, limit=limit, after=after)
    return page([_file(row) for row in rows], has_more=has_more)


@router.get("/files/{file_id}", response_model=FileObject, responses=openai_responses(NO_FILE))
def retrieve_file(file_id: str, team: TeamDep, db: DbDep) -> FileObject:
    return _file(files.get_file(db=db, team=team, file_id=file_id))


@router.delete(
    "/files/{file_id}",
    response_model=FileDeleted,
    responses=openai_responses(NO_FILE, (409, "a job that can still run uses the file")),
)
def delete_file(
    file_id: str, caller: CallerDep, db: DbDep, store: StoreDep, settings: SettingsDep
) -> FileDeleted:
    file = files.delete_file(
        db=db,
        store=store,
        team=caller.team,
        file_id=file_id,
        actor=caller.actor,
        cache=files.file_cache(settings),
    )
    return FileDeleted(id=file.id)


# A file's content is the native download itself, served on the facade's path too.
router.add_api_route(
    "/files/{file_id}/content",
    download_file,
    methods=["GET"],
    response_class=StreamingResponse,
    responses={
        200: {"description": "the file's bytes", "content": {"application/octet-stream": {}}},
        307: {"description": "redirect=true on S3: a short-lived presigned URL in Location"},
        **openai_responses(NO_FILE, (503, "the object store did not answer")),
    },
)


def _file(row: Any) -> FileObject:
    return FileObject.of(FilePublic.of(row).model_dump(mode="json"))


# ----------------------------------------------------------------------------- jobs


@router.post(
    "/fine_tuning/jobs",
    response_model=FineTuningJob,
    responses=openai_responses(
        (400, "a request it cannot honour, as OpenAI answers it: an invalid field, a model "
              "not in the registry, a file that is not the team's or not a valid dataset "
              "(`param` names the field)"),
        (409, "a request with the same Idempotency-Key is still in progress"),
        (429, "over the key's rate limit, or the team's queued-jobs or GPU-seconds quota"),
        (503, "the object store did not answer"),
    ),
)  # fmt: skip
def create_job(
    body: JobCreate,
    caller: CallerDep,
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
            team=caller.team,
            body=translation.body,
            idempotency_key=idempotency_key,
            defer=background.add_task,
            actor=caller.actor,
        )
    except TuneqError as err:
        raise renamed(err, translation) from None
    return _job(submitted.body, caller.team)


@router.get("/fine_tuning/jobs")
async def list_jobs(
    request: Request, team: TeamDep, after: str | None = None, limit: Limit = 20
) -> dict[str, Any]:
    query = JobQuery(team.id, limit, after, metadata=metadata_filter(request))
    job_reads: JobReads = request.app.state.job_reads
    native = json.loads(await job_reads.page(query))
    return page([_job(job, team) for job in native["data"]], has_more=native["has_more"])


@router.get(
    "/fine_tuning/jobs/{job_id}", response_model=FineTuningJob, responses=openai_responses(NO_JOB)
)
async def retrieve_job(job_id: str, request: Request, team: TeamDep) -> FineTuningJob:
    # What clients poll: the native road's reader (api.job_reads), then OpenAI's shape.
    job_reads: JobReads = request.app.state.job_reads
    document = await job_reads.get(team_id=team.id, job_id=job_id)
    if document is None:  # another team's job does not exist for you
        raise NotFound(f"no job {job_id!r}", param="job_id")
    return _job(json.loads(document), team)


@router.post(
    "/fine_tuning/jobs/{job_id}/cancel",
    response_model=FineTuningJob,
    responses=openai_responses(NO_JOB, (409, "the job has ended: it cannot be cancelled")),
)
def cancel_job(job_id: str, caller: CallerDep, sessions: SessionsDep) -> FineTuningJob:
    team, actor = caller.team, caller.actor
    return _job(jobs.cancel_job(sessions=sessions, team=team, job_id=job_id, actor=actor), team)


@router.post(
    "/fine_tuning/jobs/{job_id}/pause",
    response_model=FineTuningJob,
    responses=openai_responses(NO_JOB, (409, "the job has ended or is being cancelled")),
)
def pause_job(job_id: str, caller: CallerDep, sessions: SessionsDep) -> FineTuningJob:
    team, actor = caller.team, caller.actor
    return _job(jobs.pause_job(sessions=sessions, team=team, job_id=job_id, actor=actor), team)


@router.post(
    "/fine_tuning/jobs/{job_id}/resume",
    response_model=FineTuningJob,
    responses=openai_responses(NO_JOB, (409, "the job is not paused")),
)
def resume_job(
    job_id: str,
    caller: CallerDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    celery: CeleryDep,
    background: BackgroundTasks,
) -> FineTuningJob:
    resumed = jobs.resume_job(
        sessions=sessions,
        settings=settings,
        broker=celery,
        team=caller.team,
        job_id=job_id,
        defer=background.add_task,
        actor=caller.actor,
    )
    return _job(resumed, caller.team)


@router.get("/fine_tuning/jobs/{job_id}/events", responses=openai_responses(NO_JOB))
def list_events(
    job_id: str,
    team: TeamDep,
    db: DbDep,
    after: Annotated[str | None, EVENT_CURSOR] = None,
    limit: Limit = 20,
) -> dict[str, Any]:
    job = jobs.get_job(db=db, team=team, job_id=job_id)
    before = _cursor(after, EVENT_ID_PREFIX)
    events, has_more = jobs.list_events(
        db=db, job=job, after=before, limit=limit, newest_first=True
    )
    native = (EventPublic.of(event).model_dump(mode="json") for event in events)
    return page([FineTuningJobEvent.of(event) for event in native], has_more=has_more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", responses=openai_responses(NO_JOB))
def list_checkpoints(
    job_id: str,
    team: TeamDep,
    db: DbDep,
    after: Annotated[str | None, CHECKPOINT_CURSOR] = None,
    limit: Limit = 10,
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
    # ASCII digits only (int() takes "²"), few enough for the database's integers
    if not (number.isascii() and number.isdigit() and len(number) <= CURSOR_DIGITS):
        raise field_error("after", f"not an id this list gave: expected {prefix}<number>")
    return int(number)
