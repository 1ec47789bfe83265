"""Webhooks as every road in sees them: register, list, read, delete an endpoint, list its
deliveries; and `enqueue_job_event`, which the places that end a job (or record a
checkpoint) call inside their own transaction, so that a delivery is owed exactly when the
change is committed (an outbox). Sending is tuneq.webhooks.delivery's, on the worker side.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tuneq.audit.service import Actor, record
from tuneq.db import db_now, transaction, utcnow
from tuneq.errors import NotFound
from tuneq.idempotency.service import idempotent, request_hash
from tuneq.ids import new_id
from tuneq.jobs.models import Job
from tuneq.jobs.schemas import JobPublic
from tuneq.settings import Settings
from tuneq.teams.models import Team
from tuneq.webhooks.models import DeliveryState, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from tuneq.webhooks.schemas import WebhookCreate, WebhookCreated
from tuneq.webhooks.signing import new_secret
from tuneq.webhooks.targets import check_target

REGISTER = "POST /webhooks"  # the use case's name under an Idempotency-Key
Row = TypeVar("Row", WebhookEndpoint, WebhookDelivery)


def create_webhook(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    team: Team,
    body: WebhookCreate,
    idempotency_key: str | None,
    actor: Actor | None = None,
) -> dict[str, Any]:
    """Register an endpoint after checking its target (SSRF); the answer, as JSON, is the
    only one that shows the signing secret (a retry under the same Idempotency-Key gets
    the same answer)."""
    fingerprint = request_hash(REGISTER, body.model_dump_json())
    with idempotent(
        sessions,
        team_id=team.id,
        key=idempotency_key,
        method_path=REGISTER,
        fingerprint=fingerprint,
    ) as request:
        if request.replay is not None:
            return request.replay.body
        check_target(body.url, settings)
        with transaction(sessions) as db:
            endpoint = WebhookEndpoint(
                id=new_id("wh"),
                team_id=team.id,
                url=body.url,
                events=body.events,
                description=body.description,
                secret=new_secret(),
            )
            db.add(endpoint)
            db.flush()
            record(db, actor, "webhook.create", endpoint.id)
            created = WebhookCreated.of(endpoint).model_dump(mode="json")
            request.record(db, 201, created)
    return created


def list_webhooks(
    *, db: Session, team: Team, limit: int, after: str | None = None
) -> tuple[list[WebhookEndpoint], bool]:
    """A page of the team's endpoints, newest first, and whether more follow."""
    mine = WebhookEndpoint.team_id == team.id
    return _newest_first(db, WebhookEndpoint, mine, limit=limit, after=after)


def get_webhook(*, db: Session, team: Team, webhook_id: str) -> WebhookEndpoint:
    """The team's endpoint; another team's is as missing as one that never existed."""
    endpoint = db.get(WebhookEndpoint, webhook_id)
    if endpoint is None or endpoint.team_id != team.id:
        raise NotFound(f"no webhook {webhook_id!r}", param="webhook_id")
    return endpoint


def delete_webhook(
    *, db: Session, team: Team, webhook_id: str, actor: Actor | None = None
) -> WebhookEndpoint:
    """Delete the endpoint and, with it, every delivery still owed to it."""
    endpoint = get_webhook(db=db, team=team, webhook_id=webhook_id)
    db.delete(endpoint)
    record(db, actor, "webhook.delete", endpoint.id)
    return endpoint


def list_deliveries(
    *, db: Session, endpoint: WebhookEndpoint, limit: int, after: str | None = None
) -> tuple[list[tuple[WebhookDelivery, list[WebhookAttempt]]], bool]:
    """A page of the endpoint's deliveries, newest first, each with its attempts in order."""
    its = WebhookDelivery.endpoint_id == endpoint.id
    page, has_more = _newest_first(db, WebhookDelivery, its, limit=limit, after=after)
    attempts: dict[str, list[WebhookAttempt]] = defaultdict(list)
    for attempt in db.scalars(
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id.in_([d.id for d in page]))
        .order_by(WebhookAttempt.attempt)
    ):
        attempts[attempt.delivery_id].append(attempt)
    return [(d, attempts[d.id]) for d in page], has_more


def _newest_first(
    db: Session, model: type[Row], belongs: Any, *, limit: int, after: str | None
) -> tuple[list[Row], bool]:
    """A cursor page of rows whose ids sort by creation time (tuneq.ids), newest first."""
    query = select(model).where(belongs)
    if after is not None:
        query = query.where(model.id < after)
    rows = list(db.scalars(query.order_by(model.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def enqueue_job_event(
    db: Session, *, job_id: str, event_type: str, checkpoint: dict[str, Any] | None = None
) -> int:
    """Owe `event_type` to each of the job's team's endpoints that asked for it, in the
    caller's transaction, after the job's change: the payload shows the job as
    `GET /jobs/{id}` would once that transaction commits. Returns the deliveries owed."""
    job = db.scalars(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    ).one()
    endpoints = [
        e
        for e in db.scalars(select(WebhookEndpoint).where(WebhookEndpoint.team_id == job.team_id))
        if event_type in e.events
    ]
    if not endpoints:
        return 0
    data = JobPublic.of(job).model_dump(mode="json")
    if checkpoint is not None:
        data["checkpoint"] = checkpoint
    body = json.dumps(
        {"type": event_type, "timestamp": _rfc3339_now(), "data": data}, separators=(",", ":")
    )
    for endpoint in endpoints:
        db.add(
            WebhookDelivery(
                id=new_id("msg"),
                endpoint_id=endpoint.id,
                job_id=job.id,
                event_type=event_type,
                body=body,
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=db_now(),
            )
        )
    return len(endpoints)


def _rfc3339_now() -> str:
    return utcnow().isoformat(timespec="milliseconds").replace("+00:00", "Z")
