"""What the API takes and shows for webhooks: endpoints, their deliveries and attempts, and
the event types (DESIGN §4, the issue's contract 2)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, field_validator
from pydantic import Field as Member

from tuneq.documents import SECONDS_OR_ZERO, Field, public_model
from tuneq.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint

JOB_SUCCEEDED = "job.succeeded"
JOB_FAILED = "job.failed"
JOB_CANCELLED = "job.cancelled"
JOB_CHECKPOINT = "job.checkpoint"
EventType = Literal["job.succeeded", "job.failed", "job.cancelled", "job.checkpoint"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Member(max_length=2048, description="http(s) URL the events are POSTed to")
    events: list[EventType] = Member(min_length=1, description="the event types to receive")
    description: str | None = Member(None, max_length=255)

    @field_validator("events")
    @classmethod
    def _once_each(cls, events: list[str]) -> list[str]:
        return list(dict.fromkeys(events))


WEBHOOK_DOCUMENT = (
    Field("id", str, WebhookEndpoint.id),
    Field("object", str, constant="webhook"),
    Field("url", str, WebhookEndpoint.url),
    Field("events", list[str], WebhookEndpoint.events),
    Field("description", str | None, WebhookEndpoint.description),
    Field("created_at", int, WebhookEndpoint.created_at, shown=SECONDS_OR_ZERO),
)
WebhookPublic = public_model("WebhookPublic", WEBHOOK_DOCUMENT, module=__name__)
# The answer to a registration, the only one that shows the signing secret.
WebhookCreated = public_model(
    "WebhookCreated",
    (*WEBHOOK_DOCUMENT, Field("secret", str, WebhookEndpoint.secret)),
    module=__name__,
)


class WebhooksPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookPublic]
    has_more: bool


class WebhookDeleted(BaseModel):
    id: str
    object: Literal["webhook"] = "webhook"
    deleted: Literal[True] = True


AttemptPublic = public_model(
    "AttemptPublic",
    (
        Field("attempt", int, WebhookAttempt.attempt),
        Field("status_code", int | None, WebhookAttempt.status_code),  # when it answered
        Field("error", str | None, WebhookAttempt.error),  # null when it succeeded
        Field("duration_ms", int, WebhookAttempt.duration_ms),
        Field("created_at", int, WebhookAttempt.created_at, shown=SECONDS_OR_ZERO),
    ),
    module=__name__,
)


class DeliveryPublic(BaseModel):
    id: str = Member(description="the webhook-id header, the same on every attempt")
    object: Literal["webhook.delivery"] = "webhook.delivery"
    type: str
    job_id: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: list[AttemptPublic]  # type: ignore[valid-type]
    next_attempt_at: int | None = Member(description="when a pending delivery is tried next")
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
