"""`GET /jobs/{id}/events/stream` at its edges, from a real `tuneq api` (uvicorn) on loopback,
on SQLite and PostgreSQL, read with plain httpx. No worker runs: the jobs' events and states
are set up through the ORM or the API (cancel), as a worker would have written them.

The server's heartbeat is set short (0.2 s) so that a quiet stream shows it; the tests that
read events skip the comments wherever they fall.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.engine import Engine

from tests.api_helpers import TRAIN_ROWS, assert_problem, deployed_api, job_spec, jsonl
from tests.service_fixtures import auth
from tests.sse_helpers import (
    STREAM_TIMEOUT,
    Frame,
    api_server,
    carried,
    decoded,
    frames,
    is_comment,
    listed_events,
)
from tests.stack import Stack, wait_for
from tuneq.db import make_sessionmaker, transaction
from tuneq.jobs.models import Job, JobEvent
from tuneq.jobs.states import JobState, move_to

STREAM = "/jobs/{}/events/stream"
MISSING_JOB = "job-" + "0" * 26
EVENTS = 130  # more than the stream reads in one poll (100)


@dataclass
class Env:
    engine: Engine
    stack: Stack
    client: httpx.Client  # of the `tuneq api` server
    key: str
    other_key: str
    train: str

    def create_job(self) -> str:
        created = self.client.post("/jobs", headers=auth(self.key), json=job_spec(self.train))
        assert created.status_code == 201, created.text
        return created.json()["id"]

    def stream(self, job_id: str, **request: Any) -> Any:
        return self.client.stream("GET", STREAM.format(job_id), **request)

    def read_all(self, job_id: str, headers: dict[str, str] | None = None, **request: Any):
        """The response and every frame of a stream the server ends, comments left out."""
        with self.stream(job_id, headers=auth(self.key) | (headers or {}), **request) as response:
            assert response.status_code == 200, response.read()
            received = [f for f in frames(response.iter_bytes()) if not is_comment(f)]
        return response, received


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def env(request, tmp_path_factory, tiny_registry_file) -> Iterator[Env]:
    home = tmp_path_factory.mktemp(f"event-stream-{request.param}")
    with deployed_api(request.param, home, tiny_registry_file, "streamers", "others") as api:
        overrides = {
            "model_registry": str(tiny_registry_file),
            "database_url": api.settings.database_url,
            "sse_poll_seconds": 0.05,
            "sse_heartbeat_seconds": 0.2,
        }
        stack = Stack(request.param, home, overrides)
        with (
            api_server(stack) as server,
            httpx.Client(base_url=server.url, timeout=STREAM_TIMEOUT) as client,
        ):
            uploaded = client.post(
                "/files", headers=auth(api.keys[0]), files={"file": ("t.jsonl", jsonl(TRAIN_ROWS))}
            )
            assert uploaded.status_code == 201, uploaded.text
            yield Env(api.engine, stack, client, *api.keys, uploaded.json()["id"])


def _finish_with_events(engine: Engine, job_id: str) -> None:
    """What a worker leaves: many message and metrics events, then the job succeeded."""
    now = datetime.now(UTC)
    with transaction(make_sessionmaker(engine)) as db:
        for i in range(EVENTS):
            kind = "metrics" if i % 2 else "message"
            message = f"step {i}\nsecond line: é ✓"  # a newline the stream must not split on
            db.add(JobEvent(job_id=job_id, type=kind, level="info", message=message, data={"i": i}))
        db.execute(move_to(JobState.RUNNING, Job.id == job_id).values(attempt=1, started_at=now))
        db.execute(
            move_to(JobState.SUCCEEDED, Job.id == job_id).values(
                finished_at=now, result={"best_step": 6}
            )
        )


@pytest.fixture(scope="module")
def finished(env) -> str:
    """A succeeded job with EVENTS + 1 events (its creation's first)."""
    job_id = env.create_job()
    _finish_with_events(env.engine, job_id)
    return job_id


def _last_event_id(env: Env, job_id: str) -> int:
    with env.engine.connect() as connection:
        return connection.scalar(
            select(JobEvent.id).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())
        )


def _end(env: Env, job_id: str) -> Frame:
    job = env.client.get(f"/jobs/{job_id}", headers=auth(env.key))
    return {"event": "end", "data": job.json()}


def test_a_missing_job_or_another_teams_is_a_404_before_any_stream(env, finished):
    for key, job_id in ((env.other_key, finished), (env.key, MISSING_JOB)):
        response = env.client.get(STREAM.format(job_id), headers=auth(key))
        assert assert_problem(response, 404)["param"] == "job_id"
    assert_problem(env.client.get(STREAM.format(finished)), 401)


def test_a_malformed_resume_point_is_a_422_naming_it(env, finished):
    bad_header = env.client.get(
        STREAM.format(finished), headers=auth(env.key) | {"Last-Event-ID": "seven"}
    )
    assert assert_problem(bad_header, 422)["errors"][0]["field"] == "last-event-id"
    bad_query = env.client.get(
        STREAM.format(finished), params={"after": "x"}, headers=auth(env.key)
    )
    assert assert_problem(bad_query, 422)["errors"][0]["field"] == "after"


def test_a_finished_job_streams_every_event_then_end_and_closes(env, finished):
    response, received = env.read_all(finished)

    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    listed = listed_events(env.client, env.key, finished)
    assert len(listed) == EVENTS + 1
    assert received[0] == {"retry": "2000"}
    assert [decoded(f) for f in received[1:]] == [*map(carried, listed), _end(env, finished)]
    assert decoded(received[-1])["data"]["status"] == "succeeded"


def test_last_event_id_wins_over_after(env, finished):
    ids = [event["id"] for event in listed_events(env.client, env.key, finished)]

    def resumed(**request: Any) -> list[int]:
        _, received = env.read_all(finished, **request)
        assert received[0] == {"retry": "2000"} and received[-1]["event"] == "end"
        return [int(frame["id"]) for frame in received[1:-1]]

    assert resumed(params={"after": ids[9]}) == ids[10:]
    assert resumed(headers={"Last-Event-ID": str(ids[99])}) == ids[100:]
    assert resumed(params={"after": ids[9]}, headers={"Last-Event-ID": str(ids[99])}) == ids[100:]
    assert resumed(headers={"Last-Event-ID": str(ids[-1])}) == []


def test_a_quiet_stream_sends_a_heartbeat_comment(env):
    job_id = env.create_job()  # queued, and nothing will happen to it
    after = {"Last-Event-ID": str(_last_event_id(env, job_id))}
    with env.stream(job_id, headers=auth(env.key) | after) as response:
        stream = frames(response.iter_bytes())
        assert next(stream) == {"retry": "2000"}
        assert next(stream) == {"": "keep-alive"}


def test_cancelling_a_queued_job_ends_its_open_stream(env):
    job_id = env.create_job()
    after = {"Last-Event-ID": str(_last_event_id(env, job_id))}
    with env.stream(job_id, headers=auth(env.key) | after) as response:
        stream = frames(response.iter_bytes())
        assert next(stream) == {"retry": "2000"}  # the stream is open
        cancelled = env.client.post(f"/jobs/{job_id}/cancel", headers=auth(env.key))
        assert cancelled.status_code == 200, cancelled.text
        received = [decoded(f) for f in stream if not is_comment(f)]  # to the server's close

    listed = listed_events(env.client, env.key, job_id)
    assert received == [carried(listed[-1]), _end(env, job_id)]
    assert received[-1]["data"]["status"] == "cancelled"
    assert listed[-1]["message"] == "cancelled before it ran"


def _stream_samples(metrics: str) -> dict[tuple[str, str], float]:
    """The stream route's samples: (sample name, status or "") -> value."""
    return {
        (sample.name, sample.labels.get("status", "")): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.labels.get("route") == "/jobs/{job_id}/events/stream"
    }


def test_event_streams_are_counted_but_kept_out_of_the_latency_histogram(env, finished):
    before = _stream_samples(env.client.get("/metrics").text)
    env.read_all(finished)
    env.client.get(STREAM.format(MISSING_JOB), headers=auth(env.key))
    after = _stream_samples(env.client.get("/metrics").text)

    def grew(name: str, status: str = "") -> float:
        return after.get((name, status), 0) - before.get((name, status), 0)

    assert grew("tuneq_http_requests_total", "200") == 1
    assert grew("tuneq_http_requests_total", "404") == 1
    assert grew("tuneq_http_request_seconds_count") == 1  # the 404's; not the stream's


def _streams_open(env: Env) -> float:
    families = text_string_to_metric_families(env.client.get("/metrics").text)
    return next(
        s.value for f in families for s in f.samples if s.name == "tuneq_http_event_streams"
    )


def test_a_client_hanging_up_ends_its_stream_on_the_server(env):
    job_id = env.create_job()  # queued: only the client can end its stream
    with env.stream(job_id, headers=auth(env.key)) as response:
        stream = frames(response.iter_bytes())
        assert next(stream) == {"retry": "2000"}
        assert _streams_open(env) == 1
    wait_for(lambda: _streams_open(env) == 0, timeout=60, what="the server to end the stream")


def test_a_stream_open_too_long_closes_without_end(env):
    job_id = env.create_job()  # queued: nothing would end its stream
    short_lived = Stack(
        env.stack.name, env.stack.home, env.stack.overrides | {"sse_max_seconds": 1}
    )
    with (
        api_server(short_lived, "short-lived") as server,
        httpx.Client(base_url=server.url, timeout=STREAM_TIMEOUT) as client,
        client.stream("GET", STREAM.format(job_id), headers=auth(env.key)) as response,
    ):
        received = [f for f in frames(response.iter_bytes()) if not is_comment(f)]  # to the close
    created = listed_events(env.client, env.key, job_id)
    assert [decoded(f) for f in received] == [{"retry": "2000"}, *map(carried, created)]


def test_a_server_shutting_down_ends_its_open_streams(env):
    job_id = env.create_job()  # queued: its stream would wait for it forever
    with (
        api_server(env.stack, "stopping") as server,
        httpx.Client(base_url=server.url, timeout=STREAM_TIMEOUT) as client,
        client.stream("GET", STREAM.format(job_id), headers=auth(env.key)) as response,
    ):
        stream = frames(response.iter_bytes())
        assert next(stream) == {"retry": "2000"}
        env.stack.kill(server.process, signal.SIGTERM)  # fails if the server does not exit
        rest: list[Frame] = []
        with contextlib.suppress(httpx.RemoteProtocolError):  # cut mid-stream, as it is
            rest += stream
    assert all(frame.get("event") != "end" for frame in rest)  # the client will reconnect
    assert "Application shutdown complete" in server.log.read_text()  # not killed: it exited
