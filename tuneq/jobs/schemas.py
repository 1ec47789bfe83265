"""The job as the API shows it. Schemas are not ORM models (STYLE habit 5): each document is
a table of fields (tuneq.documents) from which its schema and `of(row_object)` are made; the
job's table also makes the polled reads' SELECT and encoder (api/job_reads.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from tuneq.documents import (
    FLAG,
    JSON_OR_NULL,
    OBJECT,
    SECONDS,
    SECONDS_OR_ZERO,
    Field,
    Shown,
    public_model,
)
from tuneq.jobs.models import Job, JobArtifact, JobCheckpoint, JobEvent

ADAPTER_ARTIFACT = "adapter.tar.gz"
DIAGNOSTICS_ARTIFACT = "diagnostics.jsonl"  # per-example diagnostics (peft_engine.diagnostics)


def checkpoint_artifact_name(step: int) -> str:
    return f"checkpoint-{step}.tar.gz"


JOB_DOCUMENT = (
    Field("id", str, Job.id),
    Field("object", str, constant="job"),
    Field("status", str, Job.state),
    Field("model", str, Job.model),
    Field("task", str, Job.task),
    Field("method", dict[str, Any], Job.resolved, member="method", shown=OBJECT),
    Field("hyperparameters", dict[str, Any], Job.resolved, member="hyperparameters", shown=OBJECT),
    # the devices the job runs on ({"gpus": N}); {} for a job made before the field existed
    Field("resources", dict[str, Any], Job.resolved, member="resources", shown=OBJECT),
    # what happens to the result (peft_engine/spec_delivery.py): null / [] when not asked
    Field("export", dict[str, Any] | None, Job.resolved, member="export", shown=JSON_OR_NULL),
    Field("serving", dict[str, Any] | None, Job.resolved, member="serving", shown=JSON_OR_NULL),
    Field(
        "integrations", list[Any] | None, Job.resolved, member="integrations", shown=JSON_OR_NULL
    ),  # fmt: skip
    Field("training_file", str, Job.training_file_id),
    Field("validation_file", str | None, Job.validation_file_id),
    Field("suffix", str | None, Job.suffix),
    Field("metadata", dict[str, str], Job.metadata_, shown=OBJECT),
    Field("estimate", dict[str, Any], Job.estimate, shown=JSON_OR_NULL),
    Field("progress", dict[str, Any] | None, Job.progress, shown=JSON_OR_NULL),
    Field("attempt", int, Job.attempt),
    Field("max_attempts", int, Job.max_attempts),
    Field(
        "max_runtime_seconds",
        int | None,
        Job.spec,
        member="max_runtime_seconds",
        shown=JSON_OR_NULL,
    ),  # fmt: skip
    Field("trained_tokens", int | None, Job.trained_tokens),
    Field("error", dict[str, Any] | None, Job.error, shown=JSON_OR_NULL),
    Field("result", dict[str, Any] | None, Job.result, shown=JSON_OR_NULL),
    # where the job's seconds went (result.json's "timings"); null until it has succeeded
    Field("timings", dict[str, Any] | None, Job.result, member="timings", shown=JSON_OR_NULL),
    Field("cancel_requested", bool, Job.cancel_requested, shown=FLAG),
    Field("created_at", int, Job.created_at, shown=SECONDS_OR_ZERO),
    Field("started_at", int | None, Job.started_at, shown=SECONDS),
    Field("finished_at", int | None, Job.finished_at, shown=SECONDS),
)
JobPublic = public_model("JobPublic", JOB_DOCUMENT, module=__name__)

EventPublic = public_model(
    "EventPublic",
    (
        Field("id", int, JobEvent.id),
        Field("object", str, constant="job.event"),
        Field("type", str, JobEvent.type),
        Field("level", str, JobEvent.level),
        Field("message", str, JobEvent.message),
        Field("data", dict[str, Any], JobEvent.data, shown=OBJECT),
        Field("created_at", int, JobEvent.created_at, shown=SECONDS_OR_ZERO),
    ),
    module=__name__,
)

ARTIFACT_NAME = Shown("the checkpoint's artifact name", checkpoint_artifact_name)
CheckpointPublic = public_model(
    "CheckpointPublic",
    (
        Field("object", str, constant="job.checkpoint"),
        Field("step", int, JobCheckpoint.step),
        Field("attempt", int, JobCheckpoint.attempt),
        Field("metrics", dict[str, float], JobCheckpoint.metrics, shown=OBJECT),
        Field("artifact", str, JobCheckpoint.step, shown=ARTIFACT_NAME),
        Field("created_at", int, JobCheckpoint.created_at, shown=SECONDS_OR_ZERO),
    ),
    module=__name__,
)

ArtifactPublic = public_model(
    "ArtifactPublic",
    (
        Field("object", str, constant="job.artifact"),
        Field("name", str, JobArtifact.name),
        Field("kind", str, JobArtifact.kind),
        Field("step", int | None, JobArtifact.step),
        Field("bytes", int, JobArtifact.bytes),
        Field("sha256", str, JobArtifact.sha256),
        Field("created_at", int, JobArtifact.created_at, shown=SECONDS_OR_ZERO),
    ),
    module=__name__,
)


class JobsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]  # type: ignore[valid-type]
    has_more: bool


class EventsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventPublic]  # type: ignore[valid-type]
    has_more: bool


class CheckpointsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointPublic]  # type: ignore[valid-type]
    has_more: bool


class ArtifactsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArtifactPublic]  # type: ignore[valid-type]
    has_more: bool


class JobDeleted(BaseModel):
    id: str
    object: str = "job"
    deleted: bool = True


class DryRunPublic(BaseModel):
    object: str = "job.estimate"
    model: str
    task: str
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    estimate: dict[str, Any]
