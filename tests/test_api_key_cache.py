"""A verified-key cache in each API process still refuses revoked and deleted keys, within
`api_key_cache_seconds`, in every process, and answers for each key's own team."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, update

from tests.service_fixtures import api_client, auth, new_team_key
from tuneq.db import make_engine, make_sessionmaker, transaction
from tuneq.settings import Settings
from tuneq.teams.models import ApiKey, Team
from tuneq.teams.service import VerifiedKeys, hash_key


class Clock:
    """The cache's clock, moved by the test instead of waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _revise_keys(settings: Settings, statement: Any) -> None:
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_sessionmaker(engine)) as db:
            db.execute(statement)
    finally:
        engine.dispose()


def test_a_revoked_key_is_refused_once_each_process_cache_expires(
    postgres_settings: Settings,
) -> None:
    key = new_team_key(postgres_settings, "search")
    clock = Clock()
    uncached = postgres_settings.model_copy(update={"api_key_cache_seconds": 0.0})
    # Two API processes on one database: one trusting verified keys for 5 s, one not at all.
    with api_client(postgres_settings) as cached_api, api_client(uncached) as fresh_api:
        cached_api.app.state.verified_keys = VerifiedKeys(5.0, clock=clock)
        assert cached_api.get("/jobs", headers=auth(key)).status_code == 200
        assert fresh_api.get("/jobs", headers=auth(key)).status_code == 200

        revoked = update(ApiKey).where(ApiKey.key_hash == hash_key(key))
        _revise_keys(postgres_settings, revoked.values(revoked_at=datetime.now(UTC)))

        assert fresh_api.get("/jobs", headers=auth(key)).status_code == 401
        clock.now += 4.9  # within the window the setting allows, the cached process trusts it
        assert cached_api.get("/jobs", headers=auth(key)).status_code == 200
        clock.now += 0.2
        assert cached_api.get("/jobs", headers=auth(key)).status_code == 401
        clock.now += 60  # and a refused key is not remembered as anything
        assert cached_api.get("/jobs", headers=auth(key)).status_code == 401


def test_a_deleted_key_or_team_is_refused_after_the_cache_window(
    postgres_settings: Settings,
) -> None:
    search, ads = new_team_key(postgres_settings, "search"), new_team_key(postgres_settings, "ads")
    clock = Clock()
    with api_client(postgres_settings) as client:
        client.app.state.verified_keys = VerifiedKeys(5.0, clock=clock)
        for key in (search, ads):
            assert client.get("/jobs", headers=auth(key)).status_code == 200

        _revise_keys(postgres_settings, delete(ApiKey).where(ApiKey.key_hash == hash_key(search)))
        _revise_keys(postgres_settings, delete(Team).where(Team.name == "ads"))
        clock.now += 5.1

        for key in (search, ads):
            assert client.get("/jobs", headers=auth(key)).status_code == 401


def test_cached_keys_stay_bounded_and_answer_for_their_own_team(
    postgres_settings: Settings,
) -> None:
    keys = [new_team_key(postgres_settings, f"team-{n}") for n in range(5)]
    with api_client(postgres_settings) as client:
        client.app.state.verified_keys = VerifiedKeys(60.0, max_entries=2)
        for _ in range(2):
            for n, key in enumerate(keys):
                response = client.get("/jobs/job-missing", headers=auth(key))
                assert response.status_code == 404  # authenticated: the job is what is missing
                team = client.app.state.verified_keys.team_for(key)
                assert team is None or team.name == f"team-{n}"
