"""Building blocks for service tests: settings in a temp dir, a migrated database, a team key.

Everything is real: the database is SQLite or PostgreSQL with the Alembic schema, the API
runs in-process through its ASGI app (httpx), the store is a directory or an S3 server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from tuneq.db import make_engine, make_sessionmaker, transaction
from tuneq.ids import new_id
from tuneq.jobs.models import Job
from tuneq.jobs.states import JobState
from tuneq.migrate import upgrade
from tuneq.settings import Settings
from tuneq.teams.models import Team
from tuneq.teams.service import create_key, create_team


def make_settings(home: Path, **overrides: Any) -> Settings:
    """Embedded settings under `home` (SQLite, filesystem broker, local store), overridable.

    No rate limit: tests poll faster than any client, and a module's app keeps its buckets
    from test to test (tests/test_ratelimit.py turns it on)."""
    values: dict[str, Any] = {"home": home, "lease_ttl_seconds": 3.0, "rate_limit_per_second": 0}
    values |= overrides
    return Settings(**values)


def migrate(settings: Settings) -> None:
    """Apply the Alembic migrations, as `tuneq migrate` does."""
    upgrade(settings.resolved_database_url)


def new_team_key(settings: Settings, team_name: str) -> str:
    """Create a team and one API key for it; returns the key."""
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_sessionmaker(engine)) as db:
            team = create_team(db=db, name=team_name)
            _, key = create_key(db=db, team=team)
        return key
    finally:
        engine.dispose()


def insert_job(
    sessions: Any,
    *,
    team_id: str | None = None,
    state: JobState = JobState.QUEUED,
    max_attempts: int = 2,
) -> str:
    """A job's row with no files behind it (in a new team unless one is named), for tests of
    what happens to rows: leases, events, deliveries."""
    with transaction(sessions) as db:
        if team_id is None:
            team = Team(id=new_id("team"), name=new_id("t"))
            db.add(team)
            db.flush()
            team_id = team.id
        job = Job(
            id=new_id("job"),
            team_id=team_id,
            state=state,
            model="tiny-llama",
            queue="training",
            task="causal_lm",
            training_file_id="file-x",
            spec={},
            resolved={},
            estimate={},
            max_attempts=max_attempts,
        )
        db.add(job)
        return job.id


def api_client(settings: Settings) -> TestClient:
    """A client for the real app; use as a context manager so the lifespan runs."""
    from api.app import create_app

    return TestClient(create_app(settings), raise_server_exceptions=False)


@asynccontextmanager
async def asgi_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An async client of the real app, its lifespan running, for streamed request bodies
    and concurrent requests (httpx's ASGI transport hands the app one chunk per receive())."""
    from api.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tuneq") as client:
            yield client


def chat_file(examples: int) -> bytes:
    """A valid chat JSONL file of `examples` short conversations."""
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(examples)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


TUNEQ_CLI = [sys.executable, "-m", "tuneq.cli"]


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a `tuneq` command run by a user whose state is in `home`.

    The caller's TUNEQ_* settings are dropped, except the model cache, which is shared so
    that SmolLM2 is dequantised once per test run.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEQ_")}
    env |= {"TUNEQ_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}
    if "TUNEQ_CACHE_DIR" in os.environ:
        env["TUNEQ_CACHE_DIR"] = os.environ["TUNEQ_CACHE_DIR"]
    return env


def run_cli(home: Path, *args: str, timeout: float = 300, **extra: str) -> Any:
    """`tuneq ARGS...` to completion, output captured as text."""
    return subprocess.run(
        [*TUNEQ_CLI, *args],
        env=cli_env(home, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
