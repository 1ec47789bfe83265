"""`/keys`: a team creates, lists and revokes its own API keys, so it can rotate a key
without an operator. Thin: the rules live in tuneq.teams.service."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.responses import JSONResponse

from api.deps import CallerDep, DbDep, SessionsDep
from api.openapi_docs import responses
from tuneq.db import utcnow
from tuneq.teams import service
from tuneq.teams.schemas import ApiKeyCreated, ApiKeyPublic, ApiKeyRevoked, ApiKeysPublic, KeyCreate
from tuneq.teams.service import VerifiedKeys

router = APIRouter(prefix="/keys", tags=["keys"])

Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("", status_code=201, response_model=ApiKeyCreated, responses=responses(409, 422))
def create_key(
    caller: CallerDep,
    sessions: SessionsDep,
    body: Annotated[KeyCreate | None, Body()] = None,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """A new key for the caller's team, shown in this answer only (only its hash is kept).
    To rotate: create one, switch to it, then `DELETE /keys/{prefix}` the old one."""
    created = service.create_team_key(
        sessions=sessions,
        team=caller.team,
        body=body or KeyCreate(),
        actor=caller.actor,
        idempotency_key=idempotency_key,
    )
    return JSONResponse(created, status_code=201)


@router.get("", response_model=ApiKeysPublic, responses=responses(422))
def list_keys(caller: CallerDep, db: DbDep, limit: Limit = 20, after: str | None = None) -> Any:
    """The team's keys, newest first, revoked and expired ones too; never a key itself.
    `after` is the last prefix of the previous page."""
    rows, has_more = service.list_keys(db=db, team=caller.team, limit=limit, after=after)
    now, mine = utcnow(), caller.actor.key_prefix
    data = [ApiKeyPublic.of(row, now=now, current=row.prefix == mine) for row in rows]
    return ApiKeysPublic(data=data, has_more=has_more)


@router.delete("/{prefix}", response_model=ApiKeyRevoked, responses=responses(404, 409))
def revoke_key(prefix: str, request: Request, caller: CallerDep, db: DbDep) -> Any:
    """Revoke one of the team's keys: refused from now on by this API process, and by
    every other within `TUNEQ_API_KEY_CACHE_SECONDS`. The key the request was sent with
    may be revoked too (the answer says so); revoking a revoked key changes nothing."""
    row = service.revoke_team_key(db=db, team=caller.team, prefix=prefix, actor=caller.actor)
    verified: VerifiedKeys = request.app.state.verified_keys
    anyio.from_thread.run_sync(verified.forget, row.prefix)  # the cache lives on the loop
    current = row.prefix == caller.actor.key_prefix
    note = "this is the key this request was sent with: use another one from now on"
    return ApiKeyRevoked.of(row, now=utcnow(), current=current, note=note if current else None)
