"""Helpers shared by the API test modules: specs, uploads, problem checks, a deployment and
the real app on it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy.engine import Engine

from tests.conftest import chat
from tests.infra import drop_postgres_database, fresh_postgres_database, postgres_url, require
from tests.service_fixtures import api_client, auth, make_settings, migrate, new_team_key
from tuneq.db import make_engine
from tuneq.settings import Settings

TRAIN_ROWS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(10)]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def job_spec(training_file: str, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": "tiny-llama",
        "training_file": training_file,
        "method": {"type": "lora", "r": 4, "alpha": 8},
        "hyperparameters": {
            "n_epochs": 2,
            "batch_size": 4,
            "learning_rate": 0.002,
            "max_seq_length": 64,
        },
    }
    return spec | changes


def assert_problem(response: Response, status: int) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    for member in ("type", "title", "detail"):
        assert isinstance(body.get(member), str) and body[member], (member, body)
    assert body["status"] == status
    if status == 401:
        assert response.headers.get("www-authenticate") == "Bearer"
    return body


def upload(client: TestClient, key: str, rows: list[dict[str, Any]], name: str = "t.jsonl") -> str:
    response = client.post("/files", headers=auth(key), files={"file": (name, jsonl(rows))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@contextmanager
def deployment(database: str, home: Path, registry: Path) -> Iterator[Settings]:
    """Migrated settings on SQLite under `home`, or on a fresh PostgreSQL database."""
    overrides: dict[str, Any] = {"model_registry": str(registry)}
    url = None
    if database == "postgresql":
        url = fresh_postgres_database(require(postgres_url))
        overrides["database_url"] = url
    home.mkdir(parents=True, exist_ok=True)
    try:
        settings = make_settings(home, **overrides)
        migrate(settings)
        yield settings
    finally:
        if url is not None:
            drop_postgres_database(url)


@dataclass
class DeployedApi:
    settings: Settings
    engine: Engine
    client: TestClient
    keys: list[str]  # one per team, in the order named


@contextmanager
def deployed_api(database: str, home: Path, registry: Path, *teams: str) -> Iterator[DeployedApi]:
    """The real app on a `deployment`, an engine on its database, and a key for each team."""
    with deployment(database, home, registry) as settings:
        engine = make_engine(settings.resolved_database_url)
        try:
            keys = [new_team_key(settings, team) for team in teams]
            with api_client(settings) as client:
                yield DeployedApi(settings, engine, client, keys)
        finally:
            engine.dispose()
