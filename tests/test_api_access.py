"""Who may call what: every endpoint × {no key, bad key, another team's key}.

One table names every endpoint of the app; a test checks it against `app.routes`, so a new
endpoint cannot be left out. Without a valid key every call is a 401 with
`WWW-Authenticate: Bearer`; with another team's key, team A's objects do not exist (a 404
identical to the one for an id that never existed) and collections show the caller's own
team only. Ownership filters are SQL, so the table runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import routing
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from httpx import Response

from tests.api_helpers import TRAIN_ROWS, assert_problem, deployment, job_spec, jsonl, upload
from tests.service_fixtures import api_client, auth, make_settings, new_team_key

# Served to anyone on purpose: liveness, readiness, Prometheus, the API's own docs, and the
# dashboard's page (it holds no data: it asks for a key, then calls the routes below).
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
    | {"/", "/ui"}
)
MISSING_FILE = "file-" + "0" * 26
MISSING_JOB = "job-" + "0" * 26
MISSING_WEBHOOK = "wh-" + "0" * 26
MISSING_KEY = "tq_0000000"
# A public address, so registration passes the SSRF checks without resolving a name.
WEBHOOK_URL = "https://8.8.8.8/hook"


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    # "object": one of a team's objects, by id; "collection": the caller's team's list or
    # a create; "catalogue": the same for every team (the model registry).
    kind: str
    # What team A's own key gets, where asking does not change anything (None: it would).
    owner_status: int | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


ENDPOINTS = [
    Endpoint("POST", "/files", "collection"),
    Endpoint("GET", "/files", "collection"),
    Endpoint("GET", "/files/{file_id}", "object", 200),
    Endpoint("GET", "/files/{file_id}/content", "object", 200),
    Endpoint("DELETE", "/files/{file_id}", "object", 409),  # a queued job uses it
    Endpoint("POST", "/jobs", "collection"),
    Endpoint("GET", "/jobs", "collection"),
    Endpoint("GET", "/jobs/{job_id}", "object", 200),
    Endpoint("DELETE", "/jobs/{job_id}", "object", 409),  # queued: cancel it first
    Endpoint("POST", "/jobs/{job_id}/cancel", "object"),
    Endpoint("POST", "/jobs/{job_id}/pause", "object"),
    Endpoint("POST", "/jobs/{job_id}/resume", "object", 409),  # queued, not paused
    Endpoint("GET", "/jobs/{job_id}/events", "object", 200),
    Endpoint("GET", "/jobs/{job_id}/events/stream", "object"),  # a queued job's never ends
    Endpoint("GET", "/jobs/{job_id}/metrics", "object", 200),
    Endpoint("GET", "/jobs/{job_id}/checkpoints", "object", 200),
    Endpoint("GET", "/jobs/{job_id}/artifacts", "object", 200),
    Endpoint("GET", "/jobs/{job_id}/artifacts/{name}", "object", 404),  # the job never ran
    Endpoint("GET", "/jobs/{job_id}/diagnostics", "object", 409),  # no result yet
    Endpoint("POST", "/jobs/{job_id}/exports", "object", 409),  # queued, not succeeded
    Endpoint("POST", "/jobs/{job_id}/generate", "object", 409),  # no adapter yet
    Endpoint("GET", "/models", "catalogue"),
    Endpoint("GET", "/models/{model_id}", "catalogue"),
    Endpoint("POST", "/webhooks", "collection"),
    Endpoint("GET", "/webhooks", "collection"),
    Endpoint("GET", "/webhooks/{webhook_id}", "object", 200),
    Endpoint("GET", "/webhooks/{webhook_id}/deliveries", "object", 200),
    Endpoint("DELETE", "/webhooks/{webhook_id}", "object"),
    Endpoint("POST", "/keys", "collection"),
    Endpoint("GET", "/keys", "collection"),
    Endpoint("DELETE", "/keys/{prefix}", "object"),
    Endpoint("GET", "/audit", "collection"),
    Endpoint("GET", "/quota", "collection"),
]
BY_ID = {str(e): e for e in ENDPOINTS}


def app_endpoints(app: Any) -> set[str]:
    """'METHOD /path' of every APIRoute the app serves, included routers flattened."""
    contexts = (
        routing.iter_route_contexts(app.routes)
        if hasattr(routing, "iter_route_contexts")  # FastAPI's lazily included routers
        else app.routes
    )
    found = set()
    for context in contexts:
        if isinstance(getattr(context, "original_route", context), APIRoute):
            found |= {f"{method} {context.path}" for method in context.methods}
    return found


def test_the_table_names_every_endpoint(tmp_path):
    from api.app import create_app

    served = {
        name
        for name in app_endpoints(create_app(make_settings(tmp_path)))
        if name.split(" ", 1)[1] not in PUBLIC_PATHS
        and not name.split(" ", 1)[1].startswith("/openai/v1/")  # tests/test_openai_facade_api
    }
    assert served, "no routes found: has FastAPI changed how it stores included routers?"
    assert served == set(BY_ID), "add new endpoints to ENDPOINTS (and remove gone ones)"


# ------------------------------------------------------------------------------ the world


@dataclass
class World:
    client: TestClient
    key_a: str
    key_b: str
    file_a: str
    job_a: str
    webhook_a: str

    def path(
        self,
        endpoint: Endpoint,
        *,
        file_id: str = "",
        job_id: str = "",
        webhook_id: str = "",
        prefix: str = "",
    ) -> str:
        return endpoint.path.format(
            file_id=file_id or self.file_a,
            job_id=job_id or self.job_a,
            webhook_id=webhook_id or self.webhook_a,
            prefix=prefix or self.key_a[:10],
            model_id="tiny-llama",
            name="adapter.tar.gz",
        )

    def call(self, endpoint: Endpoint, headers: dict[str, str], **ids: str) -> Response:
        """The endpoint as a well-formed request would call it (a real upload, a real spec)."""
        kwargs: dict[str, Any] = {"headers": headers}
        if str(endpoint) == "POST /files":
            kwargs["files"] = {"file": ("b.jsonl", jsonl(TRAIN_ROWS))}
        elif str(endpoint) == "POST /jobs":
            kwargs["json"] = job_spec(ids.get("file_id") or self.file_a)
        elif str(endpoint) == "POST /jobs/{job_id}/generate":
            kwargs["json"] = {"messages": [{"role": "user", "content": "Hello?"}]}
        elif str(endpoint) == "POST /jobs/{job_id}/exports":
            kwargs["json"] = {"merged": True, "dtype": "bf16"}
        elif str(endpoint) == "POST /webhooks":
            kwargs["json"] = {"url": WEBHOOK_URL, "events": ["job.succeeded"]}
        return self.client.request(endpoint.method, self.path(endpoint, **ids), **kwargs)

    def assert_team_a_untouched(self) -> None:
        a = auth(self.key_a)
        assert [f["id"] for f in self.client.get("/files", headers=a).json()["data"]] == [
            self.file_a
        ]
        jobs = self.client.get("/jobs", headers=a).json()["data"]
        assert [(j["id"], j["status"]) for j in jobs] == [(self.job_a, "queued")]
        content = self.client.get(f"/files/{self.file_a}/content", headers=a)
        assert content.status_code == 200 and content.content == jsonl(TRAIN_ROWS)
        webhooks = self.client.get("/webhooks", headers=a).json()["data"]
        assert [w["id"] for w in webhooks] == [self.webhook_a]
        keys = self.client.get("/keys", headers=a).json()["data"]
        assert [(k["prefix"], k["status"]) for k in keys] == [(self.key_a[:10], "active")]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request, tmp_path_factory, tiny_registry_file) -> Iterator[World]:
    home = tmp_path_factory.mktemp(f"access-{request.param}")
    with deployment(request.param, home, tiny_registry_file) as settings:
        key_a, key_b = new_team_key(settings, "team-a"), new_team_key(settings, "team-b")
        with api_client(settings) as client:
            file_a = upload(client, key_a, TRAIN_ROWS)
            created = client.post("/jobs", headers=auth(key_a), json=job_spec(file_a))
            assert created.status_code == 201, created.text
            webhook = client.post(
                "/webhooks",
                headers=auth(key_a),
                json={"url": WEBHOOK_URL, "events": ["job.succeeded"]},
            )
            assert webhook.status_code == 201, webhook.text
            yield World(client, key_a, key_b, file_a, created.json()["id"], webhook.json()["id"])


# ------------------------------------------------------------------------------ the table

CALLERS = {
    "no key": lambda world: {},
    "bad key": lambda world: auth("tq_" + secrets.token_urlsafe(32)),
    "not bearer": lambda world: {"Authorization": f"Basic {world.key_a}"},
    "mistyped key": lambda world: auth(world.key_a[:20] + "!" + world.key_a[21:]),
}


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_without_a_valid_key_every_endpoint_is_401(world, endpoint, caller):
    response = world.call(endpoint, CALLERS[caller](world))

    body = assert_problem(response, 401)
    assert body["code"] == "unauthorized"
    world.assert_team_a_untouched()


OBJECTS = [e for e in ENDPOINTS if e.kind == "object"]


@pytest.mark.parametrize("endpoint", OBJECTS, ids=str)
def test_another_teams_object_is_a_404_like_one_that_never_existed(world, endpoint):
    b = auth(world.key_b)
    kinds = ("file_id", "job_id", "webhook_id", "prefix")
    kind = next(k for k in kinds if f"{{{k}}}" in endpoint.path)
    owned_id, missing_id = {
        "file_id": (world.file_a, MISSING_FILE),
        "job_id": (world.job_a, MISSING_JOB),
        "webhook_id": (world.webhook_a, MISSING_WEBHOOK),
        "prefix": (world.key_a[:10], MISSING_KEY),
    }[kind]
    theirs = world.call(endpoint, b)
    missing = world.call(endpoint, b, **{kind: missing_id})

    got, never = assert_problem(theirs, 404), assert_problem(missing, 404)
    assert got["param"] == kind
    # Same answer, word for word but for the id: nothing tells "exists elsewhere" apart.
    assert json.dumps(got).replace(owned_id, "<id>") == json.dumps(never).replace(
        missing_id, "<id>"
    )
    world.assert_team_a_untouched()


@pytest.mark.parametrize("endpoint", [e for e in OBJECTS if e.owner_status], ids=str)
def test_the_owner_reaches_the_same_object(world, endpoint):
    # The control for the 404s above: the id is right, only the team differs.
    response = world.call(endpoint, auth(world.key_a))

    assert response.status_code == endpoint.owner_status, response.text
    if endpoint.owner_status == 404:  # the job exists; the artifact does not (it never ran)
        assert assert_problem(response, 404)["param"] == "name"
    world.assert_team_a_untouched()


def test_another_team_lists_only_its_own_files(world):
    response = world.client.get("/files", headers=auth(world.key_b))

    assert response.status_code == 200
    assert world.file_a not in {f["id"] for f in response.json()["data"]}


def test_another_team_lists_only_its_own_jobs(world):
    response = world.client.get("/jobs", headers=auth(world.key_b))

    assert response.status_code == 200
    assert response.json()["data"] == []
    assert world.job_a not in response.text


def test_another_teams_upload_goes_to_its_own_team(world):
    created = world.call(BY_ID["POST /files"], auth(world.key_b))

    assert created.status_code == 201, created.text
    file_b = created.json()["id"]
    assert world.client.get(f"/files/{file_b}", headers=auth(world.key_b)).status_code == 200
    assert_problem(world.client.get(f"/files/{file_b}", headers=auth(world.key_a)), 404)
    world.assert_team_a_untouched()


def test_another_team_cannot_train_on_team_as_file(world):
    b = auth(world.key_b)
    theirs = world.call(BY_ID["POST /jobs"], b)
    missing = world.call(BY_ID["POST /jobs"], b, file_id=MISSING_FILE)

    got, never = assert_problem(theirs, 422), assert_problem(missing, 422)
    assert got["param"] == "training_file"
    assert "training_file" in {e.get("field") for e in got["errors"]}
    assert json.dumps(got).replace(world.file_a, "<id>") == json.dumps(never).replace(
        MISSING_FILE, "<id>"
    )
    assert world.client.get("/jobs", headers=b).json()["data"] == []
    world.assert_team_a_untouched()


def test_another_team_lists_only_its_own_webhooks(world):
    response = world.client.get("/webhooks", headers=auth(world.key_b))

    assert response.status_code == 200
    assert response.json()["data"] == []
    assert world.webhook_a not in response.text


def test_another_teams_webhook_goes_to_its_own_team(world):
    created = world.call(BY_ID["POST /webhooks"], auth(world.key_b))

    assert created.status_code == 201, created.text
    webhook_b = created.json()["id"]
    assert world.client.get(f"/webhooks/{webhook_b}", headers=auth(world.key_b)).status_code == 200
    assert_problem(world.client.get(f"/webhooks/{webhook_b}", headers=auth(world.key_a)), 404)
    world.assert_team_a_untouched()


def test_another_team_lists_only_its_own_keys(world):
    response = world.client.get("/keys", headers=auth(world.key_b))

    assert response.status_code == 200
    assert world.key_b[:10] in {k["prefix"] for k in response.json()["data"]}
    assert world.key_a[:10] not in response.text


def test_another_teams_new_key_is_its_own_teams(world):
    created = world.call(BY_ID["POST /keys"], auth(world.key_b))

    assert created.status_code == 201, created.text
    new_b = created.json()["key"]
    assert created.json()["prefix"] in {
        k["prefix"] for k in world.client.get("/keys", headers=auth(world.key_b)).json()["data"]
    }
    assert (
        world.client.get("/files", headers=auth(new_b)).json()["data"]
        == world.client.get("/files", headers=auth(world.key_b)).json()["data"]
    )
    assert_problem(world.client.get(f"/files/{world.file_a}", headers=auth(new_b)), 404)
    world.assert_team_a_untouched()


def test_another_team_sees_only_its_own_audit_trail(world):
    ours = world.client.get("/audit", headers=auth(world.key_a)).json()["data"]
    theirs = world.client.get("/audit", headers=auth(world.key_b))

    assert theirs.status_code == 200
    assert {r["object_id"] for r in ours} >= {world.file_a, world.job_a, world.webhook_a}
    for owned in (world.file_a, world.job_a, world.webhook_a, world.key_a[:10]):
        assert owned not in theirs.text


def test_a_team_sees_only_its_own_quota_and_usage(world):
    ours = world.client.get("/quota", headers=auth(world.key_a)).json()
    theirs = world.client.get("/quota", headers=auth(world.key_b)).json()

    assert ours["team"] != theirs["team"]
    assert ours["usage"]["queued_jobs"] >= 1 and ours["usage"]["stored_bytes"] > 0
    # each team's use is what its own lists show, whatever the other holds
    for key, quota in ((world.key_a, ours), (world.key_b, theirs)):
        files = world.client.get("/files", headers=auth(key)).json()["data"]
        jobs = world.client.get("/jobs", headers=auth(key)).json()["data"]
        waiting = sum(job["status"] in ("queued", "paused") for job in jobs)
        assert quota["usage"]["stored_bytes"] == sum(f["bytes"] for f in files), quota
        assert quota["usage"]["queued_jobs"] == waiting, quota
    world.assert_team_a_untouched()


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if e.kind == "catalogue"], ids=str)
def test_the_model_catalogue_is_the_same_for_every_team(world, endpoint):
    theirs = world.call(endpoint, auth(world.key_b))
    ours = world.call(endpoint, auth(world.key_a))

    assert theirs.status_code == ours.status_code == 200
    assert theirs.json() == ours.json()


def test_every_collection_endpoint_has_an_other_team_test():
    # The object rows are covered by the parametrised 404 test; the rest by a test each.
    others = {str(e) for e in ENDPOINTS if e.kind != "object"}
    assert others == {
        "POST /files",
        "GET /files",
        "POST /jobs",
        "GET /jobs",
        "GET /models",
        "GET /models/{model_id}",
        "POST /webhooks",
        "GET /webhooks",
        "POST /keys",
        "GET /keys",
        "GET /audit",
        "GET /quota",
    }
