"""The polled job reads (api.job_reads) answer what the ORM road answers (issue 7).

`GET /jobs/{id}` and `GET /jobs` build their documents from rows, with the JSON columns'
text passed through: each document must equal `JobPublic.of(job)` (same fields, same order,
same values) for jobs in every state, with every nullable field set and unset, on SQLite
and PostgreSQL; the list must find the same jobs as an ORM query with the same filters.
Nothing here is timed: bench/api_load.py measures the speed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from api.job_reads import COLUMNS, JobDocument, JobQuery, PostgresJobReads, open_job_reads
from tests.api_helpers import deployed_api, deployment
from tests.service_fixtures import api_client, auth, make_settings, migrate, new_team_key
from tuneq.db import make_engine, make_sessionmaker, transaction
from tuneq.ids import new_id
from tuneq.jobs.models import Job
from tuneq.jobs.schemas import JobPublic
from tuneq.jobs.states import JobState
from tuneq.settings import Settings
from tuneq.teams.models import Team

T0 = datetime(2026, 11, 23, 9, 30, 15, 250_000, tzinfo=UTC)


@dataclass
class Env:
    settings: Settings
    engine: Engine
    client: TestClient
    key: str
    team_id: str
    other_key: str


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def env(request, tmp_path_factory, tiny_registry_file) -> Iterator[Env]:
    home = tmp_path_factory.mktemp(f"job-reads-{request.param}")
    with deployed_api(request.param, home, tiny_registry_file, "readers", "others") as api:
        key, other_key = api.keys
        with transaction(make_sessionmaker(api.engine)) as db:
            team_id = db.scalar(select(Team.id).where(Team.name == "readers"))
        yield Env(api.settings, api.engine, api.client, key, str(team_id), other_key)


def _job(team_id: str, n: int, **fields: Any) -> Job:
    values: dict[str, Any] = {
        "id": new_id("job"),
        "team_id": team_id,
        "state": JobState.QUEUED,
        "model": "tiny-llama",
        "queue": "training",
        "task": "causal_lm",
        "training_file_id": new_id("file"),
        "spec": {"model": "tiny-llama"},
        "resolved": {
            "method": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.05},
            "hyperparameters": {"n_epochs": 2, "learning_rate": 1e-05, "batch_size": "auto"},
        },
        "estimate": {"examples": 10 + n, "duration_seconds": 12.5, "total_steps": 3},
        "metadata_": {"run": str(n)},
        "max_attempts": 3,
        "created_at": T0 + timedelta(seconds=n),
    }
    return Job(**(values | fields))


# Every state, and each nullable or JSON field both set and unset (SQL NULL and JSON null).
CASES: dict[str, dict[str, Any]] = {
    "queued, bare": {"progress": None, "metadata_": {}, "suffix": None},
    "running, with progress": {
        "state": JobState.RUNNING,
        "attempt": 1,
        "started_at": T0 + timedelta(minutes=1, microseconds=999_999),
        "progress": {"step": 7, "total_steps": 30, "epoch": 0.5, "eta_seconds": 41.25},
        "trained_tokens": 123_456_789_012,
        "suffix": "support-bot",
        "validation_file_id": new_id("file"),
    },
    "cancelling": {"state": JobState.CANCELLING, "cancel_requested": True, "attempt": 1},
    "paused": {"state": JobState.PAUSED, "pause_requested": True},
    "succeeded": {
        "state": JobState.SUCCEEDED,
        "attempt": 2,
        "started_at": T0 + timedelta(minutes=1),
        "finished_at": T0 + timedelta(hours=2),
        "trained_tokens": 4_200,
        "result": {"adapter": {"key": "a/b", "bytes": 1 << 40}, "best_step": 20, "loss": 0.1},
    },
    "succeeded, with timings": {
        "state": JobState.SUCCEEDED,
        "finished_at": T0 + timedelta(hours=2),
        "result": {"best_step": 2, "timings": {"train_seconds": 12.5, "evaluations": 3}},
    },
    "failed": {
        "state": JobState.FAILED,
        "finished_at": T0 + timedelta(minutes=3),
        "error": {"code": "data_error", "message": 'line 3: "messages" é 東京 ✓\n', "line": 3},
    },
    "cancelled": {"state": JobState.CANCELLED, "finished_at": T0, "cancel_requested": True},
    "unicode metadata": {"metadata_": {"équipe": "recherche", "emoji": "🚀", "q": 'say "hi"'}},
    "no method in resolved": {"resolved": {}},
}


def _expected(env: Env, job_id: str) -> dict[str, Any]:
    with transaction(make_sessionmaker(env.engine)) as db:
        job = db.get(Job, job_id)
        assert job is not None
        return JobPublic.of(job).model_dump(mode="json")


@pytest.mark.parametrize("case", list(CASES))
def test_the_document_is_the_orm_document(env: Env, case: str) -> None:
    with transaction(make_sessionmaker(env.engine)) as db:
        job = _job(env.team_id, len(case), **CASES[case])
        db.add(job)
        job_id = job.id
    response = env.client.get(f"/jobs/{job_id}", headers=auth(env.key))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    expected = _expected(env, job_id)
    assert document == expected
    assert list(document) == list(expected) == list(JobPublic.model_fields)
    # the result's timings are the job's own field: null until a result holds them
    assert document["timings"] == (CASES[case].get("result") or {}).get("timings")


def test_sql_null_json_columns_read_as_the_orm_reads_them(env: Env) -> None:
    """Rows written by hand (or an older release) may hold SQL NULL where the ORM writes
    JSON null: both read the same."""
    with transaction(make_sessionmaker(env.engine)) as db:
        job = _job(env.team_id, 1, progress={"step": 1})
        db.add(job)
        job_id = job.id
    with env.engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE jobs SET metadata = 'null', progress = NULL, error = NULL, result = NULL "
                "WHERE id = :id"
            ),
            {"id": job_id},
        )
    document = env.client.get(f"/jobs/{job_id}", headers=auth(env.key)).json()
    assert document == _expected(env, job_id)
    assert document["metadata"] == {} and document["progress"] is None


def test_another_teams_job_and_a_missing_job_are_the_same_404(env: Env) -> None:
    with transaction(make_sessionmaker(env.engine)) as db:
        job = _job(env.team_id, 2)
        db.add(job)
        job_id = job.id
    theirs = env.client.get(f"/jobs/{job_id}", headers=auth(env.other_key))
    missing = env.client.get("/jobs/job-nope", headers=auth(env.key))
    assert theirs.status_code == missing.status_code == 404
    assert theirs.headers["content-type"] == "application/problem+json"
    assert theirs.json()["detail"] == f"no job {job_id!r}"
    assert missing.json()["param"] == "job_id"
    no_key = env.client.get(f"/jobs/{job_id}")
    assert no_key.status_code == 401


def _orm_page(env: Env, query: dict[str, Any]) -> list[dict[str, Any]]:
    """The list as an ORM query with the same filters would find it."""
    with transaction(make_sessionmaker(env.engine)) as db:
        statement = select(Job).where(Job.team_id == env.team_id)
        if query.get("after"):
            statement = statement.where(Job.id < query["after"])
        if query.get("status"):
            statement = statement.where(Job.state == query["status"])
        if query.get("model"):
            statement = statement.where(Job.model == query["model"])
        for name, value in query.items():
            if name.startswith("metadata["):
                statement = statement.where(Job.metadata_[name[9:-1]].as_string() == value)
        limit = int(query.get("limit", 20))
        jobs = db.scalars(statement.order_by(Job.id.desc()).limit(limit + 1)).all()
        return [JobPublic.of(job).model_dump(mode="json") for job in jobs]


def test_pages_find_what_the_orm_finds(env: Env) -> None:
    with transaction(make_sessionmaker(env.engine)) as db:
        for n in range(12):
            db.add(
                _job(
                    env.team_id,
                    n,
                    state=[JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED][n % 3],
                    model="tiny-llama" if n % 2 else "tiny-bert",
                    metadata_={"run": str(n % 4), "équipe": "a" if n < 6 else "b"},
                    progress={"step": n} if n % 3 == 1 else None,
                )
            )
    all_ids = [job["id"] for job in _orm_page(env, {"limit": 100})]
    queries: list[dict[str, Any]] = [
        {},
        {"limit": 1},
        {"limit": 5},
        {"limit": 100},
        {"limit": 5, "after": all_ids[4]},
        {"after": all_ids[-1]},
        {"status": "running"},
        {"status": "succeeded", "model": "tiny-bert"},
        {"model": "tiny-llama", "limit": 2},
        {"metadata[run]": "2"},
        {"metadata[équipe]": "b", "metadata[run]": "1"},
        {"metadata[run]": "nope"},
        {"status": "running", "metadata[équipe]": "a", "after": all_ids[1], "limit": 3},
    ]
    for query in queries:
        response = env.client.get("/jobs", params=query, headers=auth(env.key))
        assert response.status_code == 200, (query, response.text)
        page = response.json()
        found = _orm_page(env, query)
        limit = int(query.get("limit", 20))
        assert page == {"object": "list", "data": found[:limit], "has_more": len(found) > limit}
    other = env.client.get("/jobs", headers=auth(env.other_key)).json()
    assert other == {"object": "list", "data": [], "has_more": False}


def test_the_columns_are_the_documents_fields() -> None:
    """One column per field of the document but `object` (a constant), in its order."""
    fields = list(JobDocument.__struct_fields__)
    assert fields == list(JobPublic.model_fields)
    assert len(COLUMNS) == len(fields) - 1


def test_the_api_starts_while_postgresql_is_unreachable(tmp_path: Path) -> None:
    """The reader connects on its first read, as SQLAlchemy's pool does: the API starts,
    and stops, with no database to reach."""
    settings = make_settings(tmp_path, database_url="postgresql+psycopg://nobody@127.0.0.1:9/none")
    with api_client(settings) as client:
        reader = client.app.state.job_reads  # type: ignore[attr-defined]
        assert isinstance(reader, PostgresJobReads)
        health = client.get("/healthz")
        assert health.status_code == 200


def test_the_reader_leaves_no_connection_behind(tmp_path: Path, tiny_registry_file: Path) -> None:
    """The app's lifespan closes the reader's pool: nothing left connected to the database
    (which the tests then drop)."""
    with deployment("postgresql", tmp_path / "pg", tiny_registry_file) as settings:
        key = new_team_key(settings, "readers")
        engine = make_engine(settings.resolved_database_url)
        database = engine.url.database

        def connections() -> int:
            with engine.connect() as connection:
                return int(
                    connection.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE datname = :db AND pid <> pg_backend_pid()"
                        ),
                        {"db": database},
                    ).scalar_one()
                )

        try:
            with api_client(settings) as client:
                assert client.get("/jobs", headers=auth(key)).status_code == 200
                assert client.get("/jobs/job-x", headers=auth(key)).status_code == 404
                during = connections()
            # A closed connection's backend leaves pg_stat_activity when its process exits,
            # a moment after the client closed it: wait for that, a leaked one stays.
            deadline = time.monotonic() + 5
            while (after := connections()) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            engine.dispose()
    assert during >= 1  # the reader's connection (and the ORM's, for the key)
    assert after == 0


def test_sqlite_reads_take_no_write_lock(tmp_path: Path) -> None:
    """A read while another connection holds SQLite's write lock answers at once (a
    session's BEGIN IMMEDIATE would have waited for the lock)."""
    settings = make_settings(tmp_path)
    migrate(settings)
    key = new_team_key(settings, "readers")
    engine = make_engine(settings.resolved_database_url)
    reader = open_job_reads(engine)
    writer = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_sessionmaker(writer)) as db:  # BEGIN IMMEDIATE: the lock
            team_id = db.scalar(select(Team.id).where(Team.name == "readers"))
            job = _job(str(team_id), 0)
            db.add(job)
            db.flush()

            async def read() -> tuple[bytes | None, bytes]:
                with anyio.fail_after(5):  # the busy timeout is 30 s
                    got = await reader.get(team_id=str(team_id), job_id=job.id)
                    page = await reader.page(JobQuery(str(team_id), limit=20))
                return got, page

            got, page = anyio.run(read)
        assert got is None  # not committed yet: not seen
        assert json.loads(page)["data"] == []
        assert key
    finally:
        engine.dispose()
        writer.dispose()
