"""`/jobs`: create (or dry-run), read, list, steer, and read what a job produced. Thin: the
rules live in tuneq.jobs.service."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Body, Header, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

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
from tuneq.db import transaction
from tuneq.errors import NotFound
from tuneq.idempotency.service import idempotent, request_hash
from tuneq.jobs import service
from tuneq.jobs.schemas import (
    ArtifactPublic,
    CheckpointPublic,
    DryRunPublic,
    EventPublic,
    JobPublic,
)
from tuneq.queue import relay_outbox

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])

Limit = Annotated[int, Query(ge=1, le=100)]


def relay_now(sessions: Any, celery: Any) -> None:
    """Publish the new outbox rows right after the commit; the periodic relay is the backstop."""
    try:
        with transaction(sessions) as db:
            relay_outbox(db, celery)
    except Exception:  # noqa: BLE001 - the broker may be down; the beat relay retries
        log.warning("publishing after commit failed; beat's relay will retry", exc_info=True)


@router.post("", status_code=201, response_model=JobPublic | DryRunPublic)
def create_job(
    body: Annotated[dict[str, Any], Body(description="a job spec (DESIGN §5)")],
    team: TeamDep,
    sessions: SessionsDep,
    store: StoreDep,
    settings: SettingsDep,
    registry: RegistryDep,
    celery: CeleryDep,
    background: BackgroundTasks,
    dry_run: bool = False,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Any:
    # A plain def: FastAPI runs it in a worker thread, so tokenizing a large dataset never
    # blocks the event loop. Sessions are opened one after another, never nested: on
    # SQLite a write transaction holds the database lock, and a nested one would wait for
    # its own parent.
    def plan() -> service.Plan:
        with sessions() as db:
            return service.plan_job(
                db=db, store=store, settings=settings, registry=registry, team=team, body=body
            )

    if dry_run:
        planned = plan()
        view = service.resolved_view(planned)
        estimate = DryRunPublic(
            model=planned.spec.model,
            task=planned.spec.task,
            method=view["method"],
            hyperparameters=view["hyperparameters"],
            estimate=planned.estimate.as_dict(),
        )
        return JSONResponse(estimate.model_dump(mode="json"), status_code=200)

    with idempotent(
        sessions,
        team_id=team.id,
        key=idempotency_key,
        method_path="POST /jobs",
        fingerprint=request_hash("POST /jobs", json.dumps(body, sort_keys=True)),
    ) as request:
        if request.replay is not None:
            return JSONResponse(request.replay.body, status_code=request.replay.status)
        planned = plan()
        with transaction(sessions) as db:
            job = service.create_job(db=db, settings=settings, team=team, plan=planned)
            public = JobPublic.of(job).model_dump(mode="json")
            request.record(db, 201, public)
    background.add_task(relay_now, sessions, celery)
    return JSONResponse(public, status_code=201)


@router.get("")
async def list_jobs(
    request: Request,
    team: TeamDep,
    limit: Limit = 20,
    after: str | None = None,
    status: str | None = None,
    model: str | None = None,
) -> Response:
    # Polled with the status read: both go straight from rows to bytes (api.job_reads).
    metadata = {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    query = JobQuery(team.id, limit, after=after, status=status, model=model, metadata=metadata)
    job_reads: JobReads = request.app.state.job_reads
    page = await job_reads.page(query)
    return Response(page, media_type="application/json")


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(job_id: str, request: Request, team: TeamDep) -> Response:
    # The most polled route: on the event loop with PostgreSQL, no ORM (api.job_reads), and
    # the reader taken from the app rather than through a dependency (a tenth of the CPU).
    job_reads: JobReads = request.app.state.job_reads
    document = await job_reads.get(team_id=team.id, job_id=job_id)
    if document is None:  # another team's job does not exist for you
        raise NotFound(f"no job {job_id!r}", param="job_id")
    return Response(document, media_type="application/json")


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, team: TeamDep, db: DbDep) -> JobPublic:
    return JobPublic.of(service.cancel_job(db=db, team=team, job_id=job_id))


@router.post("/{job_id}/pause", response_model=JobPublic)
def pause_job(job_id: str, team: TeamDep, db: DbDep) -> JobPublic:
    return JobPublic.of(service.pause_job(db=db, team=team, job_id=job_id))


@router.post("/{job_id}/resume", response_model=JobPublic)
def resume_job(
    job_id: str,
    team: TeamDep,
    db: DbDep,
    settings: SettingsDep,
    sessions: SessionsDep,
    celery: CeleryDep,
    background: BackgroundTasks,
) -> JobPublic:
    job = service.resume_job(db=db, settings=settings, team=team, job_id=job_id)
    background.add_task(relay_now, sessions, celery)
    return JobPublic.of(job)


@router.get("/{job_id}/events")
def list_events(
    job_id: str, team: TeamDep, db: DbDep, after: int | None = None, limit: Limit = 100
) -> dict[str, Any]:
    job = service.get_job(db=db, team=team, job_id=job_id)
    events, has_more = service.list_events(db=db, job=job, after=after, limit=limit)
    return {
        "object": "list",
        "data": [EventPublic.of(e).model_dump(mode="json") for e in events],
        "has_more": has_more,
    }


@router.get("/{job_id}/metrics")
def get_metrics(job_id: str, team: TeamDep, db: DbDep) -> dict[str, Any]:
    return service.metrics_series(db=db, job=service.get_job(db=db, team=team, job_id=job_id))


@router.get("/{job_id}/checkpoints")
def list_checkpoints(job_id: str, team: TeamDep, db: DbDep) -> dict[str, Any]:
    job = service.get_job(db=db, team=team, job_id=job_id)
    rows = service.list_checkpoints(db=db, job=job)
    return {
        "object": "list",
        "data": [CheckpointPublic.of(c).model_dump(mode="json") for c in rows],
        "has_more": False,
    }


@router.get("/{job_id}/artifacts")
def list_artifacts(job_id: str, team: TeamDep, db: DbDep) -> dict[str, Any]:
    job = service.get_job(db=db, team=team, job_id=job_id)
    rows = service.list_artifacts(db=db, job=job)
    return {
        "object": "list",
        "data": [ArtifactPublic.of(a).model_dump(mode="json") for a in rows],
        "has_more": False,
    }


@router.get("/{job_id}/artifacts/{name}", response_model=None)
def download_artifact(
    job_id: str, name: str, team: TeamDep, db: DbDep, store: StoreDep
) -> Response:
    job = service.get_job(db=db, team=team, job_id=job_id)
    artifact = service.get_artifact(db=db, job=job, name=name)
    url = store.presigned_url(artifact.storage_key, filename=f"{job.id}-{artifact.name}")
    if url is not None:
        return RedirectResponse(url, status_code=307)
    return StreamingResponse(
        store.open_stream(artifact.storage_key),
        media_type="application/gzip",
        headers={
            "Content-Disposition": f'attachment; filename="{job.id}-{artifact.name}"',
            "Content-Length": str(artifact.bytes),
        },
    )
