"""The lease rules of DESIGN §3, statement by statement, on SQLite and on PostgreSQL.

Expiry is judged by the database's clock, so these tests use leases of a fraction of a
second and wait for them to pass.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from tests.infra import drop_postgres_database, fresh_postgres_database, postgres_url, require
from tests.service_fixtures import insert_job, make_settings, migrate
from tuneq.db import make_engine, make_sessionmaker, transaction
from tuneq.jobs.lease import claim_job, fenced_update, reap_expired_leases, renew_lease
from tuneq.jobs.models import Job, JobEvent, OutboxMessage
from tuneq.jobs.states import JobState

SHORT = 0.3  # seconds: a lease that expires while the test waits


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    url = None
    if request.param == "postgresql":
        url = fresh_postgres_database(require(postgres_url))
        settings = make_settings(tmp_path, database_url=url)
    else:
        settings = make_settings(tmp_path)
    migrate(settings)
    engine = make_engine(settings.resolved_database_url)
    yield make_sessionmaker(engine)
    engine.dispose()
    if url is not None:
        drop_postgres_database(url)


def _claim(sessions, job_id, owner="w1", ttl=30.0):
    with transaction(sessions) as db:
        return claim_job(db, job_id=job_id, owner=owner, lease_ttl=ttl)


def _state(sessions, job_id) -> Job:
    with sessions() as db:
        job = db.get(Job, job_id)
        assert job is not None
        return job


def _reap(sessions):
    with transaction(sessions) as db:
        return reap_expired_leases(db)


def test_only_one_claim_wins_while_the_lease_holds(sessions):
    job_id = insert_job(sessions)
    first = _claim(sessions, job_id, "w1")
    assert first is not None and first.attempt == 1 and first.fence == 1
    assert _claim(sessions, job_id, "w2") is None  # a duplicate message: dropped
    job = _state(sessions, job_id)
    assert job.state == JobState.RUNNING and job.lease_owner == "w1"
    assert job.lease_expires_at is not None and job.started_at is not None


def test_an_expired_lease_is_claimed_again_and_fences_out_the_old_owner(sessions):
    job_id = insert_job(sessions, max_attempts=3)
    old = _claim(sessions, job_id, "w1", ttl=SHORT)
    time.sleep(SHORT + 0.3)
    new = _claim(sessions, job_id, "w2")
    assert new is not None and new.attempt == 2 and new.fence == old.fence + 1

    with transaction(sessions) as db:  # the zombie's writes match nothing any more
        assert (
            fenced_update(db, old, latest_checkpoint_key="zombie", latest_checkpoint_step=9)
            is False
        )
        assert renew_lease(db, old, lease_ttl=30, progress={"step": 9}).held is False
    with transaction(sessions) as db:
        assert fenced_update(db, new, latest_checkpoint_key="jobs/x/2", latest_checkpoint_step=4)
        assert renew_lease(db, new, lease_ttl=30, progress={"step": 5}).held
    job = _state(sessions, job_id)
    assert job.latest_checkpoint_key == "jobs/x/2" and job.progress == {"step": 5}


def test_renewal_reports_cancel_and_pause_requests(sessions):
    job_id = insert_job(sessions)
    claim = _claim(sessions, job_id)
    with transaction(sessions) as db:
        db.get(Job, job_id).cancel_requested = True
    with transaction(sessions) as db:
        renewal = renew_lease(db, claim, lease_ttl=30, progress=None)
    assert renewal.held and renewal.cancel_requested and not renewal.pause_requested


def test_the_reaper_requeues_then_fails_with_worker_lost(sessions):
    job_id = insert_job(sessions, max_attempts=2)
    _claim(sessions, job_id, ttl=SHORT)
    assert _reap(sessions) == []  # the lease still holds
    time.sleep(SHORT + 0.3)
    assert _reap(sessions) == [(job_id, JobState.QUEUED)]
    job = _state(sessions, job_id)
    assert job.lease_owner is None and job.attempt == 1
    with sessions() as db:  # queued again means a new message to publish
        outbox = db.scalar(select(func.count()).where(OutboxMessage.job_id == job_id))
        assert outbox == 1

    _claim(sessions, job_id, ttl=SHORT)
    time.sleep(SHORT + 0.3)
    assert _reap(sessions) == [(job_id, JobState.FAILED)]
    job = _state(sessions, job_id)
    assert job.error["code"] == "worker_lost" and job.finished_at is not None
    assert _claim(sessions, job_id) is None  # a failed job is never claimed


def test_a_cancel_requested_job_whose_worker_died_ends_cancelled(sessions):
    job_id = insert_job(sessions)
    _claim(sessions, job_id, ttl=SHORT)
    with transaction(sessions) as db:
        job = db.get(Job, job_id)
        job.state, job.cancel_requested = JobState.CANCELLING, True
    time.sleep(SHORT + 0.3)
    assert _reap(sessions) == [(job_id, JobState.CANCELLED)]
    assert _claim(sessions, job_id) is None


def test_a_job_queued_again_is_published_only_after_its_delay(sessions):
    from celery import Celery

    from tuneq.queue import relay_outbox

    job_id = insert_job(sessions, max_attempts=3)
    _claim(sessions, job_id, ttl=SHORT)
    time.sleep(SHORT + 0.3)
    with transaction(sessions) as db:
        assert reap_expired_leases(db, first_delay=60.0) == [(job_id, JobState.QUEUED)]
    broker = Celery(broker="memory://")  # an in-memory broker: what was published, if any
    with transaction(sessions) as db:
        assert relay_outbox(db, broker) == 0  # not before its minute is up
        row = db.scalar(select(OutboxMessage).where(OutboxMessage.job_id == job_id))
        assert row is not None and row.sent_at is None and row.not_before is not None
        row.not_before = row.not_before.replace(year=2000)  # as if the minute had passed
    with transaction(sessions) as db:
        assert relay_outbox(db, broker) == 1
    with sessions() as db:
        events = db.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)).all()
    assert "worker lost on attempt 1; queued again, published in 60 s" in events
