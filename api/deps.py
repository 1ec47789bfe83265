"""Request dependencies: one database session per request, the caller's team, the services.

The session commits once, when the route returns without an error (before the response is
sent, so a client never sees a 2xx for something that was not committed). The two job reads
clients poll take `app.state.job_reads` (api.job_reads) directly, not through a dependency;
an API key not verified lately goes through `Reads`: nothing to commit, one trip to a thread.

The getters are `async def` on purpose: FastAPI runs a plain `def` dependency in the
thread pool, a trip per dependency per request for a dictionary lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, TypeVar

import anyio
from celery import Celery
from celery.backends.base import Backend
from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from peft_engine.models import ModelRegistry
from tuneq.audit.service import Actor
from tuneq.db import make_sessionmaker
from tuneq.errors import Unauthorized
from tuneq.settings import Settings
from tuneq.storage import ObjectStore
from tuneq.teams.models import Team
from tuneq.teams.service import VerifiedKeys, authenticate, key_prefix

T = TypeVar("T")


@dataclass(frozen=True)
class Reads:
    """Read-only database work, each in one worker thread with its session closed there.

    One trip to the thread pool instead of three (a session dependency's entry and exit,
    then the route), and no session left open while the event loop serialises a response:
    on SQLite every transaction holds the write lock, and under 50 clients the waiting
    sessions starved the pool for 30 s. At most `limiter` reads run at once, as many as
    the connection pool keeps: past that, each read opened and closed a connection of its
    own (a PostgreSQL backend forked per request), which cost more than the read.
    """

    sessions: sessionmaker[Session]
    limiter: anyio.CapacityLimiter

    @classmethod
    def for_engine(cls, engine: Engine) -> Reads:
        if engine.dialect.name == "postgresql":
            # A single SELECT needs no transaction: no BEGIN and ROLLBACK round trips. (SQLite
            # keeps its transactions: tuneq.db's begin hook is what orders its writers.)
            engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        pool_size = getattr(engine.pool, "size", lambda: 1)()
        return cls(make_sessionmaker(engine), anyio.CapacityLimiter(max(1, pool_size)))

    async def run(self, read: Callable[[Session], T]) -> T:
        def in_thread() -> T:
            with self.sessions() as session:
                return read(session)

        return await anyio.to_thread.run_sync(in_thread, limiter=self.limiter)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session, session.begin():
        yield session


async def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


async def get_inference_results(request: Request) -> Backend:
    return request.app.state.inference_results


class _KeyHolder(HTTPBearer):
    """The caller's team, from the keys this process verified lately, else the database.

    The bearer scheme and the team in one dependency (OpenAPI still shows the scheme): a
    dependency of a dependency is a level of FastAPI's solving on every request. A key
    that cannot be one (its checksum does not match) is refused before the database.
    """

    async def _team_and_key(self, request: Request) -> tuple[Team, str]:
        credentials = await HTTPBearer.__call__(self, request)
        if credentials is None:
            raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
        key = credentials.credentials
        verified: VerifiedKeys = request.app.state.verified_keys
        team = verified.team_for(key)
        if team is None:
            reads: Reads = request.app.state.reads
            found = await reads.run(lambda db: authenticate(db=db, key=key))
            verified.remember(key, found.team, expires_at=found.expires_at)
            team = found.team
        return team, key


class _TeamOfKey(_KeyHolder):
    async def __call__(self, request: Request) -> Team:  # type: ignore[override]
        team, _ = await self._team_and_key(request)
        return team


@dataclass(frozen=True)
class Caller:
    """Who sends a request that changes something: the key's team, and the actor the
    audit trail records (the team, the key's prefix, the request's X-Request-ID)."""

    team: Team
    actor: Actor


class _CallerOfKey(_KeyHolder):
    async def __call__(self, request: Request) -> Caller:  # type: ignore[override]
        team, key = await self._team_and_key(request)
        request_id = getattr(request.state, "request_id", None)  # api.request_ids
        return Caller(team, Actor(team.id, key_prefix=key_prefix(key), request_id=request_id))


# One scheme in the OpenAPI document, whichever of the two a route takes.
_SCHEME, _DESCRIPTION = "HTTPBearer", "an API key: tuneq admin create-key"
get_team = _TeamOfKey(auto_error=False, scheme_name=_SCHEME, description=_DESCRIPTION)
get_caller = _CallerOfKey(auto_error=False, scheme_name=_SCHEME, description=_DESCRIPTION)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
DbDep = Annotated[Session, Depends(get_db, scope="function")]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
InferenceResultsDep = Annotated[Backend, Depends(get_inference_results)]
TeamDep = Annotated[Team, Depends(get_team)]
CallerDep = Annotated[Caller, Depends(get_caller)]
