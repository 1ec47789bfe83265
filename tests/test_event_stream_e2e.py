"""A job's event stream, followed across a reconnect while a real worker trains it.

`tuneq api` (uvicorn, the real app) on loopback and a `tuneq worker` process, on SQLite and
on PostgreSQL; the client is plain httpx reading the bytes off the socket. It hangs up after
the first events, waits until the job has written more, and resumes with Last-Event-ID: in
the end it must hold every event exactly once, in order, equal to `GET /jobs/{id}/events`
paged to the end, then `end` with the job succeeded, and the server must close the stream.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api_helpers import job_spec, jsonl
from tests.conftest import chat
from tests.infra import drop_postgres_database, fresh_postgres_database, postgres_url, require
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

pytestmark = pytest.mark.e2e

TRAIN = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(40)]
VALIDATION = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(40, 48)]
FIRST_CONNECTION = 3  # events read before hanging up


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request, tmp_path_factory, tiny_registry_file) -> Iterator[Stack]:
    """The embedded stack (filesystem broker, local store) on SQLite or on PostgreSQL."""
    home = tmp_path_factory.mktemp(f"event-stream-e2e-{request.param}")
    overrides: dict[str, Any] = {"model_registry": str(tiny_registry_file)}
    if request.param == "postgresql":
        overrides["database_url"] = fresh_postgres_database(require(postgres_url))
    deployment = Stack(request.param, home, overrides)
    try:
        deployment.setup()
        yield deployment
    finally:
        deployment.stop_all()
        if request.param == "postgresql":
            drop_postgres_database(overrides["database_url"])


@pytest.fixture(scope="module")
def client(stack) -> Iterator[httpx.Client]:
    worker = stack.start("worker")
    with (
        api_server(stack) as server,
        httpx.Client(base_url=server.url, timeout=STREAM_TIMEOUT) as client,
    ):
        yield client
    stack.kill(worker, signal.SIGTERM)


def _upload(client: httpx.Client, key: str, rows: list[dict[str, Any]]) -> str:
    response = client.post("/files", headers=auth(key), files={"file": ("f.jsonl", jsonl(rows))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _read(client: httpx.Client, job_id: str, headers: dict[str, str], stop_after: int | None):
    """Frames of one connection (comments left out): `stop_after` events, then hang up; or
    (None) to the end of the stream, which only the server can end."""
    received: list[Frame] = []
    with client.stream("GET", f"/jobs/{job_id}/events/stream", headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for frame in frames(response.iter_bytes()):
            if not is_comment(frame):
                received.append(frame)
            if sum("id" in f for f in received) == stop_after:
                break  # leaving the block closes the connection
    return received


def test_a_stream_resumed_with_last_event_id_loses_and_repeats_nothing(stack, client):
    key = stack.team_key("streamers")
    spec = job_spec(_upload(client, key, TRAIN), validation_file=_upload(client, key, VALIDATION))
    spec["hyperparameters"] |= {"eval_every_steps": 5, "checkpoint_every_steps": 5}
    created = client.post("/jobs", headers=auth(key), json=spec)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    first = _read(client, job_id, auth(key), stop_after=FIRST_CONNECTION)
    assert first[0] == {"retry": "2000"} and len(first) == 1 + FIRST_CONNECTION
    wait_for(  # the job goes on while nobody listens
        lambda: len(listed_events(client, key, job_id)) > FIRST_CONNECTION + 3,
        timeout=180,
        what="the job to write events while the client is away",
    )
    resume = auth(key) | {"Last-Event-ID": first[-1]["id"]}
    second = _read(client, job_id, resume, stop_after=None)  # returns once the server closes

    assert second[0] == {"retry": "2000"} and second[-1]["event"] == "end"
    received = [decoded(frame) for frame in first[1:] + second[1:-1]]
    listed = listed_events(client, key, job_id)
    assert received == [carried(event) for event in listed]
    ids = [int(event["id"]) for event in received]
    assert ids == sorted(set(ids))  # in order, each once
    end = decoded(second[-1])
    assert end == {"event": "end", "data": client.get(f"/jobs/{job_id}", headers=auth(key)).json()}
    assert end["data"]["status"] == "succeeded", stack.log("worker")[-3000:]
    messages = [event["data"]["message"] for event in received]
    assert {"job succeeded", "checkpoint of step 5 saved"} <= set(messages)
    assert any(event["event"] == "metrics" for event in received)
