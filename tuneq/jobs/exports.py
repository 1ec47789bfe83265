"""Merged exports of a finished job: `POST /jobs/{id}/exports` asks a worker for one.

The API never builds a model: it checks the job (succeeded, a method that merges),
publishes `EXPORT_TASK` on the job's queue, then writes an event (a broker that refuses
the ask gives 503 and leaves no event: the caller asks again), and a worker builds it
(worker/exports.py) and records the artifact `merged-{dtype}.tar.gz` with an event. No
table holds a request's state: the artifact list says what exists, the job's events say
what was asked, built or failed. The same dtype asked again once its artifact exists is
answered 200 with it, and no work; two asks racing each build, and the later one's upload
is discarded when it finds the artifact recorded (one artifact of a name, ever).

A job whose spec asked `export.merged` has its export built by the training worker right
after the job is recorded succeeded (so a failed export never costs the adapter).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session, sessionmaker

from peft_engine.spec_delivery import merge_refusal
from tuneq.db import transaction
from tuneq.errors import Conflict, Unavailable, field_error
from tuneq.jobs.models import Job, JobEvent
from tuneq.jobs.states import JobState
from tuneq.teams.models import Team

EXPORT_TASK = "tuneq.export_merged"
MERGED_KIND = "merged"
ExportDtype = Literal["bf16", "fp16", "fp32"]


def merged_artifact_name(dtype: str) -> str:
    return f"merged-{dtype}.tar.gz"


class ExportRequest(BaseModel):
    """The export asked for: the merged model (the only kind so far) in `dtype`."""

    model_config = ConfigDict(extra="forbid")
    merged: Literal[True] = True
    dtype: ExportDtype = "bf16"


class ExportPublic(BaseModel):
    object: Literal["job.export"] = "job.export"
    job_id: str
    dtype: ExportDtype
    artifact: str  # its name in GET /jobs/{id}/artifacts, once built
    status: Literal["queued", "ready"]


class Broker(Protocol):
    def send_task(self, name: str, *, args: list[Any], queue: str) -> Any: ...


def request_export(
    *,
    sessions: sessionmaker[Session],
    broker: Broker,
    team: Team,
    job_id: str,
    request: ExportRequest,
) -> ExportPublic:
    """Queue the merged export of a succeeded job, or say it is there already."""
    from tuneq.jobs.service import get_job, newest_artifact

    name = merged_artifact_name(request.dtype)
    with transaction(sessions) as db:
        job = get_job(db=db, team=team, job_id=job_id)
        _check_exportable(job)
        answer = ExportPublic(job_id=job.id, dtype=request.dtype, artifact=name, status="ready")
        if newest_artifact(db=db, job=job, name=name) is not None:
            return answer
        queue = job.queue
    try:
        broker.send_task(EXPORT_TASK, args=[job_id, request.dtype], queue=queue)
    except Exception as err:  # the broker is away: the caller asks again, nothing was queued
        raise Unavailable(f"the queue did not take the export ({err}); ask again") from err
    # The event once the ask is queued: a refused ask leaves nothing behind it.
    with transaction(sessions) as db:
        message = f"merged export ({request.dtype}) requested"
        db.add(export_event(job_id, "info", message, request.dtype))
    return answer.model_copy(update={"status": "queued"})


def _check_exportable(job: Job) -> None:
    if job.state != JobState.SUCCEEDED:
        raise Conflict(
            f"job {job.id} is {job.state}: only a succeeded job's weights can be exported",
            param="job_id",
        )
    method_type = (job.resolved.get("method") or job.spec.get("method") or {}).get("type")
    reason = merge_refusal(job.task, method_type or "lora")
    if reason is not None:
        raise field_error("merged", reason)


def export_event(job_id: str, level: str, message: str, dtype: str, **data: Any) -> JobEvent:
    """An export's event (a "message"): its dtype and artifact name in `data`."""
    data = {"dtype": dtype, "artifact": merged_artifact_name(dtype), **data}
    return JobEvent(job_id=job_id, type="message", level=level, message=message, data=data)
