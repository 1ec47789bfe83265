"""Reads under many concurrent clients all complete, and request metrics keep their route
and status. Nothing here is timed; bench/api_load.py measures the speed."""

from __future__ import annotations

import anyio

from tests.service_fixtures import api_client, asgi_client, auth, new_team_key
from tuneq.settings import Settings


def test_fifty_concurrent_reads_on_sqlite_all_complete(sqlite_settings: Settings) -> None:
    # Sessions left open across the thread pool once starved SQLite's pool here (30 s, 500s).
    key = new_team_key(sqlite_settings, "search")
    statuses: list[int] = []

    async def read_many() -> None:
        async with asgi_client(sqlite_settings) as client:

            async def one(path: str) -> None:
                statuses.append((await client.get(path, headers=auth(key))).status_code)

            async with anyio.create_task_group() as tasks:
                for n in range(50):
                    tasks.start_soon(one, "/jobs?limit=20" if n % 2 else "/jobs/job-nope")

    anyio.run(read_many)

    assert sorted(statuses) == [200] * 25 + [404] * 25


def test_request_metrics_keep_their_route_and_status(sqlite_settings: Settings) -> None:
    key = new_team_key(sqlite_settings, "search")
    with api_client(sqlite_settings) as client:
        assert client.get("/jobs/job-nope", headers=auth(key)).status_code == 404
        assert client.get("/jobs", headers=auth(key)).status_code == 200
        metrics = client.get("/metrics").text

    assert 'route="/jobs/{job_id}",status="404"} 1.0' in metrics
    assert 'method="GET",route="/jobs",status="200"} 1.0' in metrics
