"""What the API takes and shows for webhooks: endpoints, their deliveries and attempts, and
the event types (DESIGN §4, the issue's contract 2)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tuneq.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint

JOB_SUCCEEDED = "job.succeeded"
JOB_FAILED = "job.failed"
JOB_CANCELLED = "job.cancelled"
JOB_CHECKPOINT = "job.checkpoint"
EventType = Literal["job.succeeded", "job.failed", "job.cancelled", "job.checkpoint"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048, description="http(s) URL the events are POSTed to")
    events: list[EventType] = Field(min_length=1, description="the event types to receive")
    description: str | None = Field(None, max_length=255)

    @field_validator("events")
    @classmethod
    def _once_each(cls, events: list[str]) -> list[str]:
        return list(dict.fromkeys(events))


class WebhookPublic(BaseModel):
    id: str
    object: Literal["webhook"] = "webhook"
    url: str
    events: list[str]
    description: str | None
    created_at: int

    @classmethod
    def of(cls, endpoint: WebhookEndpoint) -> WebhookPublic:
        return cls(
            id=endpoint.id,
            url=endpoint.url,
            events=endpoint.events,
            description=endpoint.description,
            created_at=int(endpoint.created_at.timestamp()),
        )


class WebhookCreated(WebhookPublic):
    secret: str = Field(description="the signing secret (whsec_...); shown only here")


class WebhooksPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookPublic]
    has_more: bool


class WebhookDeleted(BaseModel):
    id: str
    object: Literal["webhook"] = "webhook"
    deleted: Literal[True] = True


class AttemptPublic(BaseModel):
    attempt: int
    status_code: int | None = Field(description="the receiver's HTTP status, if it answered")
    error: str | None = Field(description="why the attempt failed; null when it succeeded")
    duration_ms: int
    created_at: int

    @classmethod
    def of(cls, attempt: WebhookAttempt) -> AttemptPublic:
        return cls(
            attempt=attempt.attempt,
            status_code=attempt.status_code,
            error=attempt.error,
            duration_ms=attempt.duration_ms,
            created_at=int(attempt.created_at.timestamp()),
        )


class DeliveryPublic(BaseModel):
    id: str = Field(description="the webhook-id header, the same on every attempt")
    object: Literal["webhook.delivery"] = "webhook.delivery"
    type: str
    job_id: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: list[AttemptPublic]
    next_attempt_at: int | None = Field(description="when a pending delivery is tried next")
    created_at: int

    @classmethod
    def of(cls, delivery: WebhookDelivery, attempts: list[WebhookAttempt]) -> DeliveryPublic:
        due = delivery.next_attempt_at if delivery.state == "pending" else None
        return cls(
            id=delivery.id,
            type=delivery.event_type,
            job_id=delivery.job_id,
            status=delivery.state,  # type: ignore[arg-type]
            attempts=[AttemptPublic.of(a) for a in attempts],
            next_attempt_at=int(due.timestamp()) if due is not None else None,
            created_at=int(delivery.created_at.timestamp()),
        )


class DeliveriesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryPublic]
    has_more: bool
