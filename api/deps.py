"""Request dependencies: one database session per request, the caller's team, the services.

The session commits once, when the route returns without an error (before the response is
sent, so a client never sees a 2xx for something that was not committed).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from peft_engine.models import ModelRegistry
from tuneq.errors import Unauthorized
from tuneq.settings import Settings
from tuneq.storage import ObjectStore
from tuneq.teams.models import Team
from tuneq.teams.service import authenticate


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session, session.begin():
        yield session


def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


_bearer = HTTPBearer(auto_error=False, description="an API key: tuneq admin create-key")


def get_team(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Team:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    with request.app.state.sessions() as session:
        return authenticate(db=session, key=credentials.credentials)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
DbDep = Annotated[Session, Depends(get_db, scope="function")]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
TeamDep = Annotated[Team, Depends(get_team)]
