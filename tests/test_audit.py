"""The audit trail through the real app on PostgreSQL: one record per state-changing
request, on every road in (native routes, the OpenAI facade), with the key's prefix and
the request's X-Request-ID; none for a refused request; `GET /audit` newest first, paged,
filtered, and a team's own only."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from tests.api_helpers import TRAIN_ROWS, assert_problem, deployed_api, job_spec, jsonl
from tests.service_fixtures import auth
from tests.test_api_access import WEBHOOK_URL
from tuneq.models import AuditRecord, Team

# A tiny LoRA through the facade: the native fields ride in `tuneq`.
FACADE_JOB = {
    "model": "tiny-llama",
    "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
    "tuneq": {
        "method": {"type": "lora", "r": 4, "alpha": 8},
        "hyperparameters": {"max_seq_length": 64},
    },
}


@dataclass
class Acting:
    """A team's key, and what its requests should have recorded, oldest first."""

    key: str
    expected: list[tuple[str, str, str, str]] = field(default_factory=list)

    def did(self, response: Response, action: str, object_id: str) -> Response:
        assert response.status_code in (200, 201), response.text
        self.expected.append((action, object_id, self.key[:10], response.headers["x-request-id"]))
        return response


@dataclass
class World:
    client: TestClient
    engine: Engine
    a: Acting
    b: Acting

    def records(self, team: str) -> int:
        with self.engine.connect() as connection:
            team_id = select(Team.id).where(Team.name == team).scalar_subquery()
            return connection.scalar(
                select(func.count()).select_from(AuditRecord).where(AuditRecord.team_id == team_id)
            )

    def trail(self, key: str, **params: Any) -> dict[str, Any]:
        response = self.client.get("/audit", headers=auth(key), params=params)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_registry_file) -> Iterator[World]:
    home = tmp_path_factory.mktemp("audit")
    with deployed_api("postgresql", home, tiny_registry_file, "team-a", "team-b") as api:
        world = World(api.client, api.engine, Acting(api.keys[0]), Acting(api.keys[1]))
        act_as(world, world.a)
        yield world


def act_as(world: World, team: Acting) -> None:
    """Every state-changing request of the native API and the facade, once each."""
    client, headers = world.client, auth(team.key)

    def upload(path: str) -> str:
        files = {"file": ("t.jsonl", jsonl(TRAIN_ROWS))}
        sent = client.post(path, headers=headers, files=files, data={"purpose": "fine-tune"})
        return team.did(sent, "file.upload", sent.json()["id"]).json()["id"]

    file_id = upload("/files")
    created = client.post("/jobs", headers=headers, json=job_spec(file_id))
    job = team.did(created, "job.create", created.json()["id"]).json()["id"]
    for step in ("pause", "resume", "cancel"):
        team.did(client.post(f"/jobs/{job}/{step}", headers=headers), f"job.{step}", job)
    team.did(client.delete(f"/jobs/{job}", headers=headers), "job.delete", job)
    hook = client.post(
        "/webhooks", headers=headers, json={"url": WEBHOOK_URL, "events": ["job.failed"]}
    )
    team.did(hook, "webhook.create", hook.json()["id"])
    team.did(
        client.delete(f"/webhooks/{hook.json()['id']}", headers=headers),
        "webhook.delete",
        hook.json()["id"],
    )
    key = client.post("/keys", headers=headers, json={"name": "spare"})
    team.did(key, "key.create", key.json()["prefix"])
    revoked = client.delete(f"/keys/{key.json()['prefix']}", headers=headers)
    team.did(revoked, "key.revoke", key.json()["prefix"])
    # The OpenAI-compatible facade: the same use cases, the same records.
    facade_file = upload("/openai/v1/files")
    facade = client.post(
        "/openai/v1/fine_tuning/jobs",
        headers=headers,
        json=FACADE_JOB | {"training_file": facade_file},
    )
    facade_job = team.did(facade, "job.create", facade.json()["id"]).json()["id"]
    for step in ("pause", "resume", "cancel"):
        sent = client.post(f"/openai/v1/fine_tuning/jobs/{facade_job}/{step}", headers=headers)
        team.did(sent, f"job.{step}", facade_job)
    team.did(
        client.delete(f"/openai/v1/files/{facade_file}", headers=headers),
        "file.delete",
        facade_file,
    )
    team.did(client.delete(f"/files/{file_id}", headers=headers), "file.delete", file_id)


def test_each_action_has_one_record_with_its_key_and_request_id(world):
    trail = world.trail(world.a.key, limit=100)

    shown = [(r["action"], r["object_id"], r["key_prefix"], r["request_id"]) for r in trail["data"]]
    assert shown == world.a.expected[::-1]  # newest first
    assert len({r["request_id"] for r in trail["data"]}) == len(shown)
    assert {r["object_type"] for r in trail["data"]} == {"file", "job", "webhook", "key"}
    assert trail["has_more"] is False


def test_a_refused_request_writes_no_record(world):
    a, before = auth(world.a.key), world.records("team-a")
    spec = job_spec("file-" + "0" * 26)

    assert_problem(world.client.post("/jobs", headers=a, json=spec | {"colour": "blue"}), 422)
    assert_problem(world.client.post("/jobs", headers=a, json=spec), 422)  # no such file
    assert_problem(world.client.post("/jobs/job-missing/cancel", headers=a), 404)
    assert_problem(world.client.delete("/files/file-missing", headers=a), 404)
    bad_file = {"file": ("t.jsonl", b"{not json\n")}
    assert_problem(world.client.post("/files", headers=a, files=bad_file), 422)
    assert_problem(world.client.post("/keys", headers=a, json={"expires_in_seconds": 0}), 422)
    assert_problem(world.client.delete("/keys/tq_0000000", headers=a), 404)
    assert_problem(world.client.post("/webhooks", headers=a, json={"url": "ftp://x"}), 422)
    assert_problem(world.client.post("/jobs", headers=auth("tq_" + "0" * 49), json=spec), 401)
    dry = world.client.post("/jobs", headers=a, params={"dry_run": "true"}, json=spec)
    assert dry.status_code == 422  # a dry run changes nothing, refused or not

    assert world.records("team-a") == before


def test_a_replayed_create_writes_no_second_record(world):
    b = auth(world.b.key) | {"Idempotency-Key": "spare-key"}
    before = world.records("team-b")
    first = world.client.post("/keys", headers=b, json={"name": "spare"})
    again = world.client.post("/keys", headers=b, json={"name": "spare"})

    assert first.status_code == again.status_code == 201
    assert world.records("team-b") == before + 1
    newest = world.trail(world.b.key, limit=1)["data"][0]
    assert newest["request_id"] == first.headers["x-request-id"] != again.headers["x-request-id"]


def test_pages_run_newest_first_without_gaps_and_filter_by_action(world):
    whole = [r["id"] for r in world.trail(world.a.key, limit=100)["data"]]
    paged, after = [], None
    while True:
        page = world.trail(world.a.key, limit=3, **({"after": after} if after else {}))
        paged += [r["id"] for r in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]

    assert paged == whole == sorted(whole, reverse=True)
    creates = world.trail(world.a.key, action="job.create")["data"]
    assert [r["object_id"] for r in creates] == [
        object_id for action, object_id, *_ in world.a.expected[::-1] if action == "job.create"
    ]
    unknown = world.client.get(
        "/audit", headers=auth(world.a.key), params={"action": "job.explode"}
    )
    assert assert_problem(unknown, 422)["param"] == "action"


def test_another_teams_records_are_never_visible(world):
    theirs = world.trail(world.b.key, limit=100)["data"]

    assert world.records("team-a") >= len(world.a.expected) > 0
    assert not {r["request_id"] for r in theirs} & {e[3] for e in world.a.expected}
    assert {r["key_prefix"] for r in theirs} <= {world.b.key[:10]}
