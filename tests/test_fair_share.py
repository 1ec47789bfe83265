"""Fair share at the claim (tuneq.quotas.fair_share), on SQLite and PostgreSQL, then on the
real stack: a team at its running-jobs quota waits while another team's newer job starts.

A message names a job, but the claim decides which job runs: the team with the least
running work first, oldest first within a team, teams at their quota skipped.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from tests.api_helpers import job_spec, jsonl
from tests.conftest import chat
from tests.infra import drop_postgres_database, fresh_postgres_database, postgres_url, require
from tests.service_fixtures import auth, insert_job, make_settings, migrate
from tests.stack import job_ended, running_stack, wait_for
from tuneq.db import make_engine, make_sessionmaker, seconds_from_now, transaction
from tuneq.ids import new_id
from tuneq.jobs.lease import fenced_update, reap_expired_leases
from tuneq.jobs.states import JobState
from tuneq.models import Job, OutboxMessage, Team
from tuneq.quotas.fair_share import claim_next, wake_teams_of, wake_waiting
from tuneq.quotas.service import set_quota


@pytest.fixture(params=["sqlite_settings", "postgres_settings"])
def db(request):
    """A migrated database (tests/conftest.py), its sessions and its settings."""
    settings = request.getfixturevalue(request.param)
    engine = make_engine(settings.resolved_database_url)
    yield make_sessionmaker(engine), settings
    engine.dispose()


def _team(sessions, name: str, **quota) -> str:
    with transaction(sessions) as db:
        team = Team(id=new_id("team"), name=name)
        db.add(team)
        db.flush()
        if quota:
            set_quota(db, team, quota)
        return team.id


def _jobs(sessions, team_id: str, n: int) -> list[str]:
    return [insert_job(sessions, team_id=team_id) for _ in range(n)]


def _claim(sessions, settings, job_id: str, owner: str = "w"):
    with transaction(sessions) as db:
        return claim_next(db, job_id=job_id, owner=owner, lease_ttl=30, settings=settings)


def test_the_team_with_the_least_running_work_goes_first(db):
    sessions, settings = db
    busy, idle = _team(sessions, "busy"), _team(sessions, "idle")
    busy_jobs = _jobs(sessions, busy, 3)
    idle_jobs = _jobs(sessions, idle, 2)  # newer than all of busy's

    # the first message (busy's oldest) starts busy's oldest: nobody runs anything yet
    assert _claim(sessions, settings, busy_jobs[0]).job_id == busy_jobs[0]
    # busy's second message: busy runs 1, idle 0, so idle's oldest goes first
    assert _claim(sessions, settings, busy_jobs[1]).job_id == idle_jobs[0]
    # 1 each: the oldest waiting job, busy's
    assert _claim(sessions, settings, busy_jobs[2]).job_id == busy_jobs[1]
    assert _claim(sessions, settings, idle_jobs[0]).job_id == idle_jobs[1]
    assert _claim(sessions, settings, idle_jobs[1]).job_id == busy_jobs[2]
    assert _claim(sessions, settings, busy_jobs[0]) is None  # nothing left: a spare message


def test_a_team_at_its_quota_waits_without_blocking_others_then_is_woken(db):
    sessions, settings = db
    capped, other = _team(sessions, "capped", running_jobs=1), _team(sessions, "other")
    capped_jobs = _jobs(sessions, capped, 3)
    other_job = _jobs(sessions, other, 1)[0]

    first = _claim(sessions, settings, capped_jobs[0])
    assert first.job_id == capped_jobs[0]
    assert _claim(sessions, settings, capped_jobs[1]).job_id == other_job
    assert _claim(sessions, settings, capped_jobs[2]) is None  # only capped waits: dropped

    with transaction(sessions) as db:  # capped's running job ends
        assert fenced_update(db, first, state=JobState.SUCCEEDED)
        woken = wake_waiting(db, settings, capped)
    assert woken == capped_jobs[1]
    with sessions() as db:
        assert (
            db.scalars(select(OutboxMessage.job_id).where(OutboxMessage.sent_at.is_(None))).all()[
                -1
            ]
            == woken
        )
        # a team without a running quota never lost a message: nothing to wake
        assert wake_waiting(db, settings, other) is None
    assert _claim(sessions, settings, woken).job_id == capped_jobs[1]


def test_a_job_held_back_by_a_hand_back_delay_is_not_claimed_early(db):
    sessions, settings = db
    team = _team(sessions, "t")
    delayed, fresh = _jobs(sessions, team, 2)
    with transaction(sessions) as db:
        db.add(OutboxMessage(job_id=delayed, not_before=seconds_from_now(600)))
    assert _claim(sessions, settings, fresh).job_id == fresh
    assert _claim(sessions, settings, fresh) is None  # the delayed one waits its turn


def test_a_running_jobs_message_is_a_duplicate_unless_its_lease_expired(db):
    sessions, settings = db
    team = _team(sessions, "t")
    running, waiting = _jobs(sessions, team, 2)
    with transaction(sessions) as db:
        claimed = claim_next(db, job_id=running, owner="w1", lease_ttl=0.3, settings=settings)
    assert claimed.job_id == running
    # a copy of its message takes the next job due, never the running one
    assert _claim(sessions, settings, running).job_id == waiting
    time.sleep(0.6)  # running's lease lapses (by the database's clock)
    again = _claim(sessions, settings, running, owner="w2")
    assert again.job_id == running and again.attempt == 2


def test_concurrent_claims_never_pass_a_teams_running_quota_on_postgresql(tmp_path):
    url = fresh_postgres_database(require(postgres_url))
    try:
        settings = make_settings(tmp_path, database_url=url)
        migrate(settings)
        engine = make_engine(url)  # its pool opens more connections on demand
        sessions = make_sessionmaker(engine)
        capped = _team(sessions, "capped", running_jobs=2)
        jobs = _jobs(sessions, capped, 8)
        with ThreadPoolExecutor(8) as pool:
            claims = list(pool.map(lambda j: _claim(sessions, settings, j, owner=j), jobs))
        assert sum(claim is not None for claim in claims) == 2
        with sessions() as db:
            running = db.scalars(select(Job.id).where(Job.state == JobState.RUNNING)).all()
        assert sorted(running) == sorted(jobs[:2])  # and the two oldest
        engine.dispose()
    finally:
        drop_postgres_database(url)


# --- on the real stack: PostgreSQL, Redis, S3, two `tuneq worker` processes ------------

ROWS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(40)]


@pytest.mark.e2e
def test_a_team_over_its_quota_waits_while_another_teams_newer_job_starts_first(
    tmp_path, tiny_registry_file
):
    overrides = {
        "model_registry": str(tiny_registry_file),
        "reaper_interval_seconds": 1.0,
        "relay_interval_seconds": 1.0,
        "quota_running_jobs": 1,  # the default for every team
    }
    with running_stack("production", tmp_path / "stack", overrides) as stack:
        keys = {team: stack.team_key(team) for team in ("alpha", "beta")}
        with stack.client() as api:

            def submit(team: str, steps_epochs: int) -> str:
                key = keys[team]
                training = api.post(
                    "/files", headers=auth(key), files={"file": ("t.jsonl", jsonl(ROWS))}
                )
                assert training.status_code == 201, training.text
                spec = job_spec(training.json()["id"], validation_split=0.0)
                spec["hyperparameters"] |= {
                    "n_epochs": steps_epochs,
                    "checkpoint_every_steps": 1000,
                }
                created = api.post("/jobs", headers=auth(key), json=spec)
                assert created.status_code == 201, created.text
                return created.json()["id"]

            for n in (1, 2):
                stack.start("worker", f"worker-{n}", env={"OMP_NUM_THREADS": "1"})
            for n in (1, 2):
                wait_for(
                    lambda n=n: "ready" in stack.log(f"worker-{n}"), timeout=120, what="workers"
                )
            # alpha fills the queue first; beta's job is the newest of all
            alpha_jobs = [submit("alpha", 6) for _ in range(3)]
            beta_job = submit("beta", 1)

            seen_running: set[int] = set()

            def started(job_id: str, key: str) -> float | None:
                job = api.get(f"/jobs/{job_id}", headers=auth(key)).json()
                return job["started_at"]

            def watch() -> bool:
                states = [
                    api.get(f"/jobs/{j}", headers=auth(keys["alpha"])).json()["status"]
                    for j in alpha_jobs
                ]
                seen_running.add(sum(s == "running" for s in states))
                return started(beta_job, keys["beta"]) is not None

            wait_for(watch, timeout=180, interval=0.2, what="beta's job to start")
            # beta's job started while alpha's second and third still waited for alpha's slot
            assert started(alpha_jobs[0], keys["alpha"]) is not None
            assert started(alpha_jobs[1], keys["alpha"]) is None
            assert started(alpha_jobs[2], keys["alpha"]) is None
            for job_id in alpha_jobs:
                ended = job_ended(api, keys["alpha"], job_id, timeout=300)
                assert ended["status"] == "succeeded", ended
                seen_running.add(
                    sum(
                        api.get(f"/jobs/{j}", headers=auth(keys["alpha"])).json()["status"]
                        == "running"
                        for j in alpha_jobs
                    )
                )
            assert max(seen_running) == 1, seen_running  # never two of alpha's at once
            with make_sessionmaker(make_engine(stack.settings.resolved_database_url))() as db:
                attempts = db.scalars(select(Job.attempt).where(Job.id.in_(alpha_jobs))).all()
            assert attempts == [1, 1, 1]


def test_the_reaper_wakes_a_team_whose_lost_job_freed_its_slot(db):
    sessions, settings = db
    capped = _team(sessions, "capped", running_jobs=1)
    lost, waiting = _jobs(sessions, capped, 2)
    with transaction(sessions) as db:
        claim = claim_next(db, job_id=lost, owner="w1", lease_ttl=0.3, settings=settings)
    assert claim.job_id == lost
    assert _claim(sessions, settings, waiting) is None  # at its quota: the message is dropped
    with transaction(sessions) as db:  # its last attempt's worker vanishes
        db.get(Job, lost).max_attempts = 1
    time.sleep(0.6)
    with transaction(sessions) as db:
        moved = reap_expired_leases(db)
        assert moved == [(lost, JobState.FAILED)]
        assert wake_teams_of(db, settings, [lost]) == [waiting]
    assert _claim(sessions, settings, waiting).job_id == waiting
