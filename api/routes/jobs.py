"""`/jobs`: create (or dry-run), read, list, steer, read what a job produced, and try it.
Thin: the rules live in tuneq.jobs.service and tuneq.inference.service."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Body, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from api.deps import (
    CallerDep,
    CeleryDep,
    DbDep,
    InferenceResultsDep,
    RegistryDep,
    SessionsDep,
    SettingsDep,
    StoreDep,
    TeamDep,
)
from api.downloads import Redirect, stored_object_response
from api.job_reads import JobQuery, JobReads
from api.openapi_docs import json_body, responses
from tuneq.errors import NotFound
from tuneq.inference import service as inference
from tuneq.inference.schemas import GenerateRequest, Generation
from tuneq.jobs import exports, retention, service
from tuneq.jobs.exports import ExportPublic, ExportRequest
from tuneq.jobs.schemas import (
    ArtifactPublic,
    ArtifactsPublic,
    CheckpointPublic,
    CheckpointsPublic,
    DryRunPublic,
    JobDeleted,
    JobPublic,
    JobsPublic,
)

router = APIRouter(prefix="/jobs", tags=["jobs"])

Limit = Annotated[int, Query(ge=1, le=100)]
NO_JOB = (404, "no such job (another team's job does not exist for you)")
STORE = (503, "the object store did not answer")


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    openapi_extra=json_body("JobSpec"),
    responses={
        200: {"model": DryRunPublic, "description": "dry_run=true: the spec resolved, with "
              "the tokens, steps and time it would take; nothing is created"},
        **responses(
            (409, "a request with the same Idempotency-Key is still in progress"),
            (422, "the spec is invalid, or does not suit its model or its files: `param` "
                  "names the field (model_not_found, invalid_training_file with the lines at "
                  "fault, invalid_hyperparameters; insufficient_gpu_memory when no GPU queue of "
                  "TUNEQ_GPU_QUEUE_MEMORY_GIB holds the estimated peak; unsupported_hardware "
                  "for a 4-bit base where no GPU queue is listed and the API cannot run "
                  "4-bit either); a file id that is "
                  "not the team's; the same Idempotency-Key with another body"),
            (429, "over the key's rate limit, or the team's queued-jobs or GPU-seconds quota "
                  "(the problem names the quota, its limit and use)"),
            STORE,
        ),
    },
)  # fmt: skip
def create_job(
    body: Annotated[dict[str, Any], Body(description="a job spec (DESIGN §5)")],
    caller: CallerDep,
    sessions: SessionsDep,
    store: StoreDep,
    settings: SettingsDep,
    registry: RegistryDep,
    celery: CeleryDep,
    background: BackgroundTasks,
    dry_run: bool = False,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    # A plain def: FastAPI runs it in a worker thread, so tokenizing a large dataset never
    # blocks the event loop. The job is published once the response has gone.
    submitted = service.submit_job(
        sessions=sessions,
        store=store,
        settings=settings,
        registry=registry,
        broker=celery,
        team=caller.team,
        body=body,
        dry_run=dry_run,
        idempotency_key=idempotency_key,
        defer=background.add_task,
        actor=caller.actor,
    )
    return JSONResponse(submitted.body, status_code=submitted.status)


@router.get("", response_model=JobsPublic)
async def list_jobs(
    request: Request,
    team: TeamDep,
    limit: Limit = 20,
    after: str | None = None,
    status: str | None = None,
    model: str | None = None,
) -> Response:
    # Polled with the status read: both go straight from rows to bytes (api.job_reads).
    metadata = metadata_filter(request)
    query = JobQuery(team.id, limit, after=after, status=status, model=model, metadata=metadata)
    job_reads: JobReads = request.app.state.job_reads
    page = await job_reads.page(query)
    return Response(page, media_type="application/json")


def metadata_filter(request: Request) -> dict[str, str]:
    """The `metadata[key]=value` query parameters, as {key: value}."""
    return {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.items()
        if key.startswith("metadata[") and key.endswith("]")
    }


@router.get("/{job_id}", response_model=JobPublic, responses=responses(NO_JOB))
async def get_job(job_id: str, request: Request, team: TeamDep) -> Response:
    # The most polled route: on the event loop with PostgreSQL, no ORM (api.job_reads), and
    # the reader taken from the app rather than through a dependency (a tenth of the CPU).
    job_reads: JobReads = request.app.state.job_reads
    document = await job_reads.get(team_id=team.id, job_id=job_id)
    if document is None:  # another team's job does not exist for you
        raise NotFound(f"no job {job_id!r}", param="job_id")
    return Response(document, media_type="application/json")


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    responses=responses(NO_JOB, (409, "the job has ended: it cannot be cancelled")),
)
def cancel_job(job_id: str, caller: CallerDep, sessions: SessionsDep) -> JobPublic:
    return service.cancel_job(
        sessions=sessions, team=caller.team, job_id=job_id, actor=caller.actor
    )


@router.post(
    "/{job_id}/pause",
    response_model=JobPublic,
    responses=responses(NO_JOB, (409, "the job has ended or is being cancelled")),
)
def pause_job(job_id: str, caller: CallerDep, sessions: SessionsDep) -> JobPublic:
    return service.pause_job(sessions=sessions, team=caller.team, job_id=job_id, actor=caller.actor)


@router.post(
    "/{job_id}/resume",
    response_model=JobPublic,
    responses=responses(NO_JOB, (409, "the job is not paused")),
)
def resume_job(
    job_id: str,
    caller: CallerDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    celery: CeleryDep,
    background: BackgroundTasks,
) -> JobPublic:
    return service.resume_job(
        sessions=sessions,
        settings=settings,
        broker=celery,
        team=caller.team,
        job_id=job_id,
        defer=background.add_task,
        actor=caller.actor,
    )


@router.delete(
    "/{job_id}",
    response_model=JobDeleted,
    responses=responses(
        NO_JOB, (409, "the job can still run (queued, running, paused): cancel it first"), STORE
    ),
)
def delete_job(
    job_id: str, caller: CallerDep, sessions: SessionsDep, store: StoreDep
) -> JobDeleted:
    """Delete a finished job and everything it stored: the adapter, every checkpoint, the
    diagnostics, its events and metrics. It is gone: its address is a 404 afterwards."""
    deleted = retention.delete_job(
        sessions=sessions, store=store, team=caller.team, job_id=job_id, actor=caller.actor
    )
    return JobDeleted(id=deleted)


@router.get("/{job_id}/metrics", responses=responses(NO_JOB))
def get_metrics(job_id: str, team: TeamDep, db: DbDep) -> dict[str, Any]:
    return service.metrics_series(db=db, job=service.get_job(db=db, team=team, job_id=job_id))


@router.get("/{job_id}/checkpoints", response_model=CheckpointsPublic, responses=responses(NO_JOB))
def list_checkpoints(job_id: str, team: TeamDep, db: DbDep) -> dict[str, Any]:
    job = service.get_job(db=db, team=team, job_id=job_id)
    return list_page(map(CheckpointPublic.of, service.list_checkpoints(db=db, job=job)))


@router.get("/{job_id}/artifacts", response_model=ArtifactsPublic, responses=responses(NO_JOB))
def list_artifacts(job_id: str, team: TeamDep, db: DbDep) -> dict[str, Any]:
    job = service.get_job(db=db, team=team, job_id=job_id)
    return list_page(map(ArtifactPublic.of, service.list_artifacts(db=db, job=job)))


@router.post(
    "/{job_id}/exports",
    status_code=202,
    response_model=ExportPublic,
    responses={
        200: {"model": ExportPublic, "description": "that export's artifact exists already"},
        **responses(NO_JOB, (409, "the job has not succeeded"),
                    (422, "a method or task whose weights cannot merge (`param`: merged)")),
    },
)  # fmt: skip
def request_export(
    job_id: str, body: ExportRequest, caller: CallerDep, sessions: SessionsDep, celery: CeleryDep
) -> JSONResponse:
    """The merged model (base + adapter, safetensors), built by a worker: it appears as
    `merged-{dtype}.tar.gz` in the artifacts, with an event (tuneq/jobs/exports.py)."""
    answer = exports.request_export(
        sessions=sessions, broker=celery, team=caller.team, job_id=job_id, request=body
    )
    return JSONResponse(answer.model_dump(), status_code=202 if answer.status == "queued" else 200)


@router.get(
    "/{job_id}/artifacts/{name}",
    response_model=None,
    responses={
        200: {"description": "the artifact (local store)",
              "content": {"application/gzip": {}, "application/x-ndjson": {}}},
        307: {"description": "redirect=true on S3: a short-lived presigned URL in Location"},
        **responses((404, "no such job, or no artifact of that name"), STORE),
    },
)  # fmt: skip
def download_artifact(
    job_id: str, name: str, team: TeamDep, db: DbDep, store: StoreDep, redirect: Redirect = True
) -> Response:
    job = service.get_job(db=db, team=team, job_id=job_id)
    artifact = service.get_artifact(db=db, job=job, name=name)
    return stored_object_response(
        store,
        artifact.storage_key,
        filename=f"{job.id}-{artifact.name}",
        media_type="application/x-ndjson" if name.endswith(".jsonl") else "application/gzip",
        size=artifact.bytes,
        redirect=redirect,
    )


@router.get(
    "/{job_id}/diagnostics",
    responses=responses(
        NO_JOB, (409, "job_not_finished, or diagnostics_unavailable (see below)"), STORE
    ),
)
def get_diagnostics(job_id: str, team: TeamDep, db: DbDep, store: StoreDep) -> dict[str, Any]:
    """The worst validation examples, the hardest training examples and the most confused
    label pairs of a finished job (409 job_not_finished before it has a result, 409
    diagnostics_unavailable for a job that ran before they were recorded)."""
    job = service.get_job(db=db, team=team, job_id=job_id)
    return service.read_diagnostics(db=db, store=store, job=job)


@router.post(
    "/{job_id}/generate",
    response_model=Generation,
    responses={
        **responses(
            NO_JOB,
            (409, "adapter_not_ready: the job has no adapter yet (ask for a checkpoint)"),
            (422, "an input the job's task does not take, or over a limit; a checkpoint "
                  "the job does not have (the field is named)"),
            (503, "inference_unavailable: no worker took the request in time, or its "
                  "answer did not come in time"),
        ),
    },
)  # fmt: skip
async def generate(
    job_id: str,
    body: GenerateRequest,
    team: TeamDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    celery: CeleryDep,
    results: InferenceResultsDep,
) -> Any:
    """Try the job's adapter, or one of its checkpoints: a chat reply (causal_lm), a label
    with each label's probability (seq_classification), a tag per word
    (token_classification). A worker answers, on the job's inference queue; this waits
    without holding a thread."""
    return await inference.generate(
        sessions=sessions,
        broker=celery,
        results=results,
        settings=settings,
        team=team,
        job_id=job_id,
        body=body,
    )


def list_page(items: Iterable[BaseModel], *, has_more: bool = False) -> dict[str, Any]:
    """A list as every list route shows it (DESIGN §4)."""
    return {
        "object": "list",
        "data": [item.model_dump(mode="json") for item in items],
        "has_more": has_more,
    }
