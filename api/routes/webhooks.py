"""`/webhooks`: register an endpoint (its secret shown once), list, read, delete, and see
its deliveries with every attempt. Thin: the rules live in tuneq.webhooks.service."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse

from api.deps import CallerDep, DbDep, SessionsDep, SettingsDep, TeamDep
from api.openapi_docs import responses
from tuneq.webhooks import service
from tuneq.webhooks.schemas import (
    DeliveriesPublic,
    DeliveryPublic,
    WebhookCreate,
    WebhookCreated,
    WebhookDeleted,
    WebhookPublic,
    WebhooksPublic,
)

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

Limit = Annotated[int, Query(ge=1, le=100)]
NO_WEBHOOK = (404, "no such webhook (another team's does not exist for you)")


@router.post(
    "",
    status_code=201,
    response_model=WebhookCreated,
    responses=responses(
        (409, "a request with the same Idempotency-Key is still in progress"),
        (422, "an invalid field (`param` names it): a URL that is not http(s), or whose host "
              "is private or not allowed (TUNEQ_WEBHOOK_ALLOWED_HOSTS), an unknown event"),
    ),
)  # fmt: skip
def create_webhook(
    body: WebhookCreate,
    caller: CallerDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    # A plain def: the target's name is resolved (a blocking lookup) off the event loop.
    created = service.create_webhook(
        sessions=sessions,
        settings=settings,
        team=caller.team,
        body=body,
        idempotency_key=idempotency_key,
        actor=caller.actor,
    )
    return JSONResponse(created, status_code=201)


@router.get("", response_model=WebhooksPublic)
def list_webhooks(team: TeamDep, db: DbDep, limit: Limit = 20, after: str | None = None) -> Any:
    endpoints, has_more = service.list_webhooks(db=db, team=team, limit=limit, after=after)
    return WebhooksPublic(data=[WebhookPublic.of(e) for e in endpoints], has_more=has_more)


@router.get("/{webhook_id}", response_model=WebhookPublic, responses=responses(NO_WEBHOOK))
def get_webhook(webhook_id: str, team: TeamDep, db: DbDep) -> Any:
    return WebhookPublic.of(service.get_webhook(db=db, team=team, webhook_id=webhook_id))


@router.delete("/{webhook_id}", response_model=WebhookDeleted, responses=responses(NO_WEBHOOK))
def delete_webhook(webhook_id: str, caller: CallerDep, db: DbDep) -> Any:
    endpoint = service.delete_webhook(
        db=db, team=caller.team, webhook_id=webhook_id, actor=caller.actor
    )
    return WebhookDeleted(id=endpoint.id)


@router.get(
    "/{webhook_id}/deliveries", response_model=DeliveriesPublic, responses=responses(NO_WEBHOOK)
)
def list_deliveries(
    webhook_id: str, team: TeamDep, db: DbDep, limit: Limit = 20, after: str | None = None
) -> Any:
    endpoint = service.get_webhook(db=db, team=team, webhook_id=webhook_id)
    page, has_more = service.list_deliveries(db=db, endpoint=endpoint, limit=limit, after=after)
    return DeliveriesPublic(
        data=[DeliveryPublic.of(delivery, attempts) for delivery, attempts in page],
        has_more=has_more,
    )
