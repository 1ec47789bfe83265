"""A team's own keys (`/keys`) and the operator's (`tuneq admin create-key|list-keys|
revoke-key`), on PostgreSQL through the real app: rotation, another team's key, revocation
and expiry within the verified-key cache's lifetime, a mistyped key told apart without the
database, and keys made before checksums."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select, update
from sqlalchemy.engine import Engine

from tests.api_helpers import assert_problem
from tests.service_fixtures import api_client, auth, make_settings, new_team_key, run_cli
from tests.test_api_key_cache import Clock
from tuneq.db import make_engine, make_sessionmaker, transaction
from tuneq.idempotency.models import IdempotencyKey
from tuneq.ids import new_id
from tuneq.models import ApiKey, AuditRecord, Team
from tuneq.settings import Settings
from tuneq.teams.service import VerifiedKeys, hash_key


@contextmanager
def database(settings: Settings) -> Iterator[Any]:
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_sessionmaker(engine)) as db:
            yield db
    finally:
        engine.dispose()


def prefix(key: str) -> str:
    return key[:10]


def create(client: TestClient, key: str, **body: Any) -> dict[str, Any]:
    response = client.post("/keys", headers=auth(key), json=body)
    assert response.status_code == 201, response.text
    return response.json()


def listed(client: TestClient, key: str) -> dict[str, dict[str, Any]]:
    response = client.get("/keys", headers=auth(key))
    assert response.status_code == 200, response.text
    return {shown["prefix"]: shown for shown in response.json()["data"]}


def refused(response: Any, reason: str) -> None:
    assert reason in assert_problem(response, 401)["detail"]


def test_a_team_rotates_its_key(postgres_settings):
    old = new_team_key(postgres_settings, "search")
    with api_client(postgres_settings) as client:
        created = create(client, old, name="ci-2027")
        new = created["key"]
        assert new.startswith("tq_") and created["prefix"] == prefix(new)
        assert (created["name"], created["status"], created["current"]) == (
            "ci-2027",
            "active",
            False,
        )

        keys = listed(client, new)
        assert keys.keys() == {prefix(old), prefix(new)}
        assert keys[prefix(new)]["current"] and not keys[prefix(old)]["current"]
        listing = client.get("/keys", headers=auth(new)).text
        assert old not in listing and new not in listing  # never a key itself

        revoked = client.delete(f"/keys/{prefix(old)}", headers=auth(new))
        assert revoked.status_code == 200, revoked.text
        assert (revoked.json()["status"], revoked.json()["current"]) == ("revoked", False)
        refused(client.get("/jobs", headers=auth(old)), "revoked")
        assert client.get("/jobs", headers=auth(new)).status_code == 200
        again = client.delete(f"/keys/{prefix(old)}", headers=auth(new))  # changes nothing
        assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    with database(postgres_settings) as db:
        assert db.scalar(select(func.count()).select_from(ApiKey)) == 2
        assert new.encode() not in repr(list(db.execute(select(ApiKey)))).encode()


def test_a_team_may_revoke_the_key_it_is_using(postgres_settings):
    key = new_team_key(postgres_settings, "search")
    with api_client(postgres_settings) as client:
        other = create(client, key)["key"]
        response = client.delete(f"/keys/{prefix(key)}", headers=auth(key))

        assert response.status_code == 200, response.text
        assert response.json()["current"] is True
        assert "this request was sent with" in response.json()["note"]
        refused(client.get("/jobs", headers=auth(key)), "revoked")  # at once, in this process
        assert client.get("/jobs", headers=auth(other)).status_code == 200


def test_another_teams_key_is_a_404_and_never_listed(postgres_settings):
    search, ads = new_team_key(postgres_settings, "search"), new_team_key(postgres_settings, "ads")
    with api_client(postgres_settings) as client:
        theirs = client.delete(f"/keys/{prefix(search)}", headers=auth(ads))
        never = client.delete("/keys/tq_0000000", headers=auth(ads))

        got = assert_problem(theirs, 404)
        assert got["param"] == "prefix"
        assert got["detail"].replace(prefix(search), "<p>") == assert_problem(never, 404)[
            "detail"
        ].replace("tq_0000000", "<p>")
        assert prefix(search) not in listed(client, ads)
        assert client.get("/jobs", headers=auth(search)).status_code == 200


def test_a_revoked_key_is_refused_within_the_cache_lifetime(postgres_settings):
    key = new_team_key(postgres_settings, "search")
    clock = Clock()
    # Two API processes on one database: one trusting verified keys for 5 s.
    with api_client(postgres_settings) as cached_api, api_client(postgres_settings) as other_api:
        cached_api.app.state.verified_keys = VerifiedKeys(5.0, clock=clock)
        assert cached_api.get("/jobs", headers=auth(key)).status_code == 200
        spare = create(other_api, key)["key"]
        assert other_api.delete(f"/keys/{prefix(key)}", headers=auth(spare)).status_code == 200

        refused(other_api.get("/jobs", headers=auth(key)), "revoked")
        clock.now += 4.9  # within the setting's window the cached process still trusts it
        assert cached_api.get("/jobs", headers=auth(key)).status_code == 200
        clock.now += 0.2
        refused(cached_api.get("/jobs", headers=auth(key)), "revoked")


def test_an_expired_key_is_refused_and_never_trusted_past_its_expiry(postgres_settings):
    key = new_team_key(postgres_settings, "search")
    clock = Clock()
    with api_client(postgres_settings) as client:
        # A cache that would trust a key for two hours; the key expires in one.
        client.app.state.verified_keys = VerifiedKeys(7200.0, clock=clock)
        expiring = create(client, key, expires_in_seconds=3600)
        assert expiring["expires_at"] - expiring["created_at"] in (3599, 3600, 3601)
        assert client.get("/jobs", headers=auth(expiring["key"])).status_code == 200

        with database(postgres_settings) as db:  # an hour goes by, for the database
            past = datetime.now(UTC) - timedelta(seconds=1)
            db.execute(
                update(ApiKey).where(ApiKey.prefix == expiring["prefix"]).values(expires_at=past)
            )
        clock.now += 3500  # the cache still trusts it: its hour is not over on its clock
        assert client.get("/jobs", headers=auth(expiring["key"])).status_code == 200
        clock.now += 101  # past its expiry, though the cache entry had an hour more
        refused(client.get("/jobs", headers=auth(expiring["key"])), "expired")
        assert listed(client, key)[expiring["prefix"]]["status"] == "expired"


@contextmanager
def counted_queries() -> Iterator[list[str]]:
    """Every SQL statement any engine in this process runs meanwhile."""
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(Engine, "before_cursor_execute", count)


def one_character_changed(key: str, position: int) -> str:
    replacement = "A" if key[position] != "A" else "B"
    return key[:position] + replacement + key[position + 1 :]


@pytest.mark.parametrize("mistake", ["body", "checksum", "cut short", "one more", "prefix"])
def test_a_mistyped_key_is_malformed_and_costs_no_query(postgres_settings, mistake):
    key = new_team_key(postgres_settings, "search")
    wrong = {
        "body": one_character_changed(key, 20),
        "checksum": one_character_changed(key, len(key) - 2),
        "cut short": key[:-1],
        "one more": key + "x",
        "prefix": "tk_" + key[3:],
    }[mistake]
    uncached = postgres_settings.model_copy(update={"api_key_cache_seconds": 0.0})
    with api_client(uncached) as client:
        with counted_queries() as control:
            assert client.get("/keys", headers=auth(key)).status_code == 200
        with counted_queries() as statements:
            response = client.get("/keys", headers=auth(wrong))

        assert control  # the right key is looked up...
        assert statements == []  # ...the mistyped one is not
        refused(response, "malformed")


def test_keys_made_before_checksums_still_work(postgres_settings):
    new_team_key(postgres_settings, "search")
    legacy = "tq_" + secrets.token_urlsafe(32)  # the format of every key made before
    with database(postgres_settings) as db:
        team = db.scalar(select(Team).where(Team.name == "search"))
        db.add(
            ApiKey(
                id=new_id("key"), team_id=team.id, prefix=prefix(legacy), key_hash=hash_key(legacy)
            )
        )
    with api_client(postgres_settings) as client:
        assert client.get("/jobs", headers=auth(legacy)).status_code == 200
        assert listed(client, legacy)[prefix(legacy)]["current"] is True
        # No checksum to tell a typo: only the lookup answers, and it does not know the key.
        refused(client.get("/jobs", headers=auth(one_character_changed(legacy, 20))), "not valid")


BAD_BODIES = {
    "expiry in the past": ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
    "expiry without a time zone": ({"expires_at": "2030-01-01T00:00:00"}, "expires_at"),
    "both expiries": (
        {"expires_in_seconds": 60, "expires_at": "2030-01-01T00:00:00Z"},
        "expires_at",
    ),
    "zero seconds": ({"expires_in_seconds": 0}, "expires_in_seconds"),
    "a name too long": ({"name": "n" * 101}, "name"),
    "an unknown field": ({"scopes": ["read"]}, "scopes"),
}


def test_bad_bodies_name_the_field_and_write_nothing(postgres_settings):
    key = new_team_key(postgres_settings, "search")
    with api_client(postgres_settings) as client:
        for case, (body, field) in BAD_BODIES.items():
            problem = assert_problem(client.post("/keys", headers=auth(key), json=body), 422)
            assert problem["param"] == field, case
            assert field in {item.get("field") for item in problem["errors"]}, case
    with database(postgres_settings) as db:
        assert db.scalar(select(func.count()).select_from(ApiKey)) == 1
        assert db.scalar(select(func.count()).select_from(AuditRecord)) == 0


def test_a_repeated_idempotency_key_makes_one_key_and_stores_no_secret(postgres_settings):
    key = new_team_key(postgres_settings, "search")
    with api_client(postgres_settings) as client:
        headers = auth(key) | {"Idempotency-Key": "rotate-1"}
        first = client.post("/keys", headers=headers, json={"name": "ci"})
        second = client.post("/keys", headers=headers, json={"name": "ci"})

        assert first.status_code == second.status_code == 201
        assert first.json()["key"] and second.json()["key"] is None
        assert {k: v for k, v in first.json().items() if k != "key"} == {
            k: v for k, v in second.json().items() if k != "key"
        }
        assert len(listed(client, key)) == 2
    with database(postgres_settings) as db:
        stored = db.scalars(select(IdempotencyKey.response_body)).all()
        assert stored and first.json()["key"] not in repr(stored)


def test_the_list_pages_newest_first(postgres_settings):
    key = new_team_key(postgres_settings, "search")
    with api_client(postgres_settings) as client:
        made = [create(client, key, name=f"k{n}")["prefix"] for n in range(3)]
        first = client.get("/keys", headers=auth(key), params={"limit": 2}).json()
        rest = client.get(
            "/keys", headers=auth(key), params={"limit": 2, "after": first["data"][-1]["prefix"]}
        ).json()

        pages = [k["prefix"] for k in first["data"] + rest["data"]]
        assert pages == [*reversed(made), prefix(key)]
        assert (first["has_more"], rest["has_more"]) == (True, False)
        elsewhere = client.get("/keys", headers=auth(key), params={"after": "tq_nothere"})
        assert elsewhere.json() == {"object": "list", "data": [], "has_more": False}


# ------------------------------------------------------------------------------ the CLI


def cli_ok(home: Path, *args: str) -> str:
    done = run_cli(home, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_operator_creates_lists_and_revokes_keys(tmp_path):
    home = tmp_path / "home"
    cli_ok(home, "migrate")
    cli_ok(home, "admin", "create-team", "search")
    named = cli_ok(
        home, "admin", "create-key", "--team", "search", "--name", "ci", "--expires-in", "30d"
    )
    key = named.strip().splitlines()[-1]
    plain = cli_ok(home, "admin", "create-key", "--team", "search").strip().splitlines()[-1]
    in_30_days = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%d")
    assert f"expires {in_30_days}" in named

    table = cli_ok(home, "admin", "list-keys", "--team", "search").splitlines()
    assert table[0].split() == ["PREFIX", "NAME", "CREATED", "EXPIRES", "REVOKED"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert rows.keys() == {prefix(key), prefix(plain)}
    assert " ci " in rows[prefix(key)] and in_30_days in rows[prefix(key)]
    assert "never" in rows[prefix(plain)]
    assert key not in "\n".join(table) and plain not in "\n".join(table)

    revoked = cli_ok(home, "admin", "revoke-key", prefix(key))
    assert f"revoked {prefix(key)} of team search" in revoked
    after = cli_ok(home, "admin", "list-keys", "--team", "search").splitlines()
    revoked_row = next(line for line in after if line.startswith(prefix(key)))
    assert revoked_row.rstrip().endswith("UTC") and not rows[prefix(key)].rstrip().endswith("UTC")
    with api_client(make_settings(home)) as client:
        refused(client.get("/jobs", headers=auth(key)), "revoked")
        assert client.get("/jobs", headers=auth(plain)).status_code == 200
        trail = client.get("/audit", headers=auth(plain)).json()["data"]
    assert [(r["action"], r["object_id"], r["key_prefix"]) for r in trail] == [
        ("key.revoke", prefix(key), None),
        ("key.create", prefix(plain), None),
        ("key.create", prefix(key), None),
    ]


def test_revoke_key_refuses_an_ambiguous_or_unknown_prefix(tmp_path):
    home = tmp_path / "home"
    cli_ok(home, "migrate")
    cli_ok(home, "admin", "create-team", "search")
    twins = ["tq_ab" + secrets.token_urlsafe(32)[:41] for _ in range(2)]
    with database(make_settings(home)) as db:
        team = db.scalar(select(Team).where(Team.name == "search"))
        for twin in twins:
            db.add(
                ApiKey(
                    id=new_id("key"), team_id=team.id, prefix=prefix(twin), key_hash=hash_key(twin)
                )
            )

    ambiguous = run_cli(home, "admin", "revoke-key", "tq_ab")
    unknown = run_cli(home, "admin", "revoke-key", "tq_zz")
    bare = run_cli(home, "admin", "revoke-key", "tq_")
    bad_expiry = run_cli(home, "admin", "create-key", "--team", "search", "--expires-in", "soon")

    assert ambiguous.returncode == 2
    assert ambiguous.stderr.strip().startswith("error: 2 keys match 'tq_ab' (")
    assert "give a longer prefix" in ambiguous.stderr
    assert (unknown.returncode, unknown.stderr.strip()) == (2, "error: no key starts with 'tq_zz'")
    assert bare.returncode == 2 and "the prefix list-keys shows" in bare.stderr
    assert bad_expiry.returncode == 2 and "not a duration: 'soon'" in bad_expiry.stderr
    with database(make_settings(home)) as db:
        assert db.scalars(select(ApiKey.revoked_at)).all() == [None, None]
