"""`/webhooks` through the real app, on SQLite and on PostgreSQL: register (secret shown
once, Idempotency-Key), list, read, delete, other teams' endpoints, refused targets."""

from __future__ import annotations

import base64

import pytest

from tests.api_helpers import assert_problem, deployment
from tests.service_fixtures import api_client, auth, new_team_key


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path, tiny_registry_file):
    with deployment(request.param, tmp_path / "home", tiny_registry_file) as settings:
        yield settings


def _client(settings, **webhook_settings):
    return api_client(settings.model_copy(update=webhook_settings))


def _create(
    client, key, url="https://8.8.8.8/hook", events=("job.succeeded",), headers=None, **extra
):
    body = {"url": url, "events": list(events)} | extra
    return client.post("/webhooks", headers=auth(key) | (headers or {}), json=body)


def test_register_read_list_and_delete(settings):
    key = new_team_key(settings, "a")
    with _client(settings) as client:
        created = _create(client, key, events=["job.failed", "job.succeeded"], description="CI")
        assert created.status_code == 201, created.text
        webhook = created.json()
        secret = webhook.pop("secret")
        assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) >= 24
        assert webhook["url"] == "https://8.8.8.8/hook" and webhook["description"] == "CI"
        assert webhook["events"] == ["job.failed", "job.succeeded"]

        shown = client.get(f"/webhooks/{webhook['id']}", headers=auth(key)).json()
        assert shown == webhook  # the secret is shown once, when created

        more = [_create(client, key).json()["id"] for _ in range(2)]
        first = client.get("/webhooks?limit=2", headers=auth(key)).json()
        assert [w["id"] for w in first["data"]] == more[::-1] and first["has_more"]
        after = client.get(f"/webhooks?limit=2&after={more[0]}", headers=auth(key)).json()
        assert [w["id"] for w in after["data"]] == [webhook["id"]] and not after["has_more"]
        assert all("secret" not in w for w in first["data"] + after["data"])

        deliveries = client.get(f"/webhooks/{webhook['id']}/deliveries", headers=auth(key))
        assert deliveries.json() == {"object": "list", "data": [], "has_more": False}

        deleted = client.delete(f"/webhooks/{webhook['id']}", headers=auth(key))
        assert deleted.json() == {"id": webhook["id"], "object": "webhook", "deleted": True}
        assert_problem(client.get(f"/webhooks/{webhook['id']}", headers=auth(key)), 404)


def test_another_teams_webhook_does_not_exist_for_you(settings):
    mine, theirs = new_team_key(settings, "mine"), new_team_key(settings, "theirs")
    with _client(settings) as client:
        webhook_id = _create(client, theirs).json()["id"]
        for method, path in (
            ("GET", f"/webhooks/{webhook_id}"),
            ("GET", f"/webhooks/{webhook_id}/deliveries"),
            ("DELETE", f"/webhooks/{webhook_id}"),
        ):
            assert_problem(client.request(method, path, headers=auth(mine)), 404)
        assert client.get("/webhooks", headers=auth(mine)).json()["data"] == []
        assert client.get(f"/webhooks/{webhook_id}", headers=auth(theirs)).status_code == 200


def test_unknown_event_types_and_fields_are_refused(settings):
    key = new_team_key(settings, "a")
    with _client(settings) as client:
        bad = assert_problem(_create(client, key, events=["job.succeeded", "job.exploded"]), 422)
        assert bad["errors"][0]["field"] == "events.1"
        assert assert_problem(_create(client, key, events=[]), 422)["param"] == "events"
        extra = assert_problem(_create(client, key, secret="mine"), 422)
        assert extra["errors"][0] == {"message": "unknown field", "field": "secret"}


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://localhost/hook", "loopback"),
        ("http://10.0.0.7/hook", "private"),
        ("http://169.254.169.254/latest", "link-local"),
        ("http://[::ffff:192.168.1.1]/hook", "private"),
        ("file:///etc/passwd", "http or https"),
    ],
)
def test_private_targets_are_refused_unless_the_operator_allows_them(settings, url, reason):
    key = new_team_key(settings, "a")
    with _client(settings) as client:
        refused = assert_problem(_create(client, key, url=url), 422)
    assert refused["param"] == "url" and refused["errors"][0]["field"] == "url"
    assert reason in refused["detail"]
    if reason != "http or https":
        with _client(settings, webhook_allow_private=True) as client:
            assert _create(client, key, url=url).status_code == 201


def test_the_operators_allowlist(settings):
    key = new_team_key(settings, "a")
    allowlist = {"webhook_allowed_hosts": ("1.1.1.1", "*.hooks.example")}
    with _client(settings, **allowlist) as client:
        assert _create(client, key, url="https://1.1.1.1/hook").status_code == 201
        refused = assert_problem(_create(client, key, url="https://8.8.8.8/hook"), 422)
        assert refused["param"] == "url" and "TUNEQ_WEBHOOK_ALLOWED_HOSTS" in refused["detail"]
    local = {"webhook_allowed_hosts": ("localhost",), "webhook_allow_private": True}
    with _client(settings, **local) as client:
        assert _create(client, key, url="http://localhost:9000/hook").status_code == 201
        assert_problem(_create(client, key, url="http://127.0.0.1:9000/hook"), 422)


def test_idempotency_key_gives_back_the_same_webhook(settings):
    key = new_team_key(settings, "a")
    with _client(settings) as client:
        again = {"headers": {"Idempotency-Key": "register-1"}}
        first = _create(client, key, **again)
        second = _create(client, key, **again)
        assert first.status_code == second.status_code == 201
        assert second.json() == first.json()
        assert len(client.get("/webhooks", headers=auth(key)).json()["data"]) == 1
        other = _create(client, key, url="https://1.1.1.1/hook", **again)
        assert assert_problem(other, 422)["code"] == "idempotency_key_reused"
