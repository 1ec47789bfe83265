"""The job as the API shows it. Schemas are not ORM models (STYLE habit 5)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from tuneq.jobs.models import Job, JobArtifact, JobCheckpoint, JobEvent


def unix_seconds(value: datetime | None) -> int | None:
    """A timestamp as the API shows it: whole seconds since the epoch."""
    return int(value.timestamp()) if value is not None else None


class JobPublic(BaseModel):
    id: str
    object: str = "job"
    status: str
    model: str
    task: str
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    training_file: str
    validation_file: str | None
    suffix: str | None
    metadata: dict[str, str]
    estimate: dict[str, Any]
    progress: dict[str, Any] | None
    attempt: int
    trained_tokens: int | None
    error: dict[str, Any] | None
    result: dict[str, Any] | None
    cancel_requested: bool
    created_at: int
    started_at: int | None
    finished_at: int | None

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        return cls(
            id=job.id,
            status=job.state,
            model=job.model,
            task=job.task,
            method=job.resolved.get("method", {}),
            hyperparameters=job.resolved.get("hyperparameters", {}),
            training_file=job.training_file_id,
            validation_file=job.validation_file_id,
            suffix=job.suffix,
            metadata=job.metadata_ or {},
            estimate=job.estimate,
            progress=job.progress,
            attempt=job.attempt,
            trained_tokens=job.trained_tokens,
            error=job.error,
            result=job.result,
            cancel_requested=job.cancel_requested,
            created_at=unix_seconds(job.created_at) or 0,
            started_at=unix_seconds(job.started_at),
            finished_at=unix_seconds(job.finished_at),
        )


class DryRunPublic(BaseModel):
    object: str = "job.estimate"
    model: str
    task: str
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    estimate: dict[str, Any]


class EventPublic(BaseModel):
    id: int
    object: str = "job.event"
    type: str
    level: str
    message: str
    data: dict[str, Any]
    created_at: int

    @classmethod
    def of(cls, event: JobEvent) -> EventPublic:
        return cls(
            id=event.id,
            type=event.type,
            level=event.level,
            message=event.message,
            data=event.data or {},
            created_at=unix_seconds(event.created_at) or 0,
        )


class CheckpointPublic(BaseModel):
    object: str = "job.checkpoint"
    step: int
    attempt: int
    metrics: dict[str, float]
    artifact: str
    created_at: int

    @classmethod
    def of(cls, checkpoint: JobCheckpoint) -> CheckpointPublic:
        return cls(
            step=checkpoint.step,
            attempt=checkpoint.attempt,
            metrics=checkpoint.metrics or {},
            artifact=checkpoint_artifact_name(checkpoint.step),
            created_at=unix_seconds(checkpoint.created_at) or 0,
        )


class ArtifactPublic(BaseModel):
    object: str = "job.artifact"
    name: str
    kind: str
    step: int | None
    bytes: int
    sha256: str
    created_at: int

    @classmethod
    def of(cls, artifact: JobArtifact) -> ArtifactPublic:
        return cls(
            name=artifact.name,
            kind=artifact.kind,
            step=artifact.step,
            bytes=artifact.bytes,
            sha256=artifact.sha256,
            created_at=unix_seconds(artifact.created_at) or 0,
        )


ADAPTER_ARTIFACT = "adapter.tar.gz"


def checkpoint_artifact_name(step: int) -> str:
    return f"checkpoint-{step}.tar.gz"
