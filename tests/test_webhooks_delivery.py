"""Sending what is owed, on SQLite and on PostgreSQL: the claim (two deliverers never send
the same attempt), retries on the schedule, a deleted endpoint, the target checked again
before each attempt. The receiver is a real HTTP server on loopback."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from tests.api_helpers import deployment
from tests.service_fixtures import insert_job
from tests.stack import wait_for
from tests.webhook_receiver import receiver
from tuneq.db import db_now, make_engine, make_sessionmaker, transaction, utcnow
from tuneq.ids import new_id
from tuneq.jobs.lease import claim_job, reap_expired_leases
from tuneq.jobs.models import Job
from tuneq.jobs.service import cancel_job
from tuneq.jobs.states import JobState
from tuneq.teams.service import create_team
from tuneq.webhooks.delivery import (
    Outcome,
    claim_due,
    deliver_due,
    record_attempt,
)
from tuneq.webhooks.models import DeliveryState, WebhookAttempt, WebhookDelivery
from tuneq.webhooks.schemas import WebhookCreate
from tuneq.webhooks.service import create_webhook, delete_webhook, get_webhook, list_deliveries


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path, tiny_registry_file):
    with deployment(request.param, tmp_path / "home", tiny_registry_file) as settings:
        yield settings.model_copy(
            update={"webhook_allow_private": True, "webhook_retry_schedule_seconds": (0, 0)}
        )


@pytest.fixture
def sessions(settings):
    engine = make_engine(settings.resolved_database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _register(sessions, settings, url, events=("job.cancelled",)):
    with transaction(sessions) as db:
        team = create_team(db=db, name=new_id("team"))
    body = WebhookCreate(url=url, events=list(events))
    webhook = create_webhook(
        sessions=sessions, settings=settings, team=team, body=body, idempotency_key=None
    )
    return team, webhook["id"]


def _owe(sessions, endpoint_id, count=1):
    """Deliveries owed to the endpoint, due now (as enqueue_job_event writes them)."""
    ids = [new_id("msg") for _ in range(count)]
    with transaction(sessions) as db:
        for delivery_id in ids:
            db.add(
                WebhookDelivery(
                    id=delivery_id,
                    endpoint_id=endpoint_id,
                    job_id="job-test",
                    event_type="job.cancelled",
                    body='{"type":"job.cancelled"}',
                    state=DeliveryState.PENDING,
                    attempts=0,
                    next_attempt_at=db_now(),
                )
            )
    return ids


def _expire_leases(sessions):
    with transaction(sessions) as db:
        db.execute(update(WebhookDelivery).values(next_attempt_at=utcnow() - timedelta(seconds=1)))


def _claim_in_two_threads(sessions):
    """Two deliverers claiming a few at a time until nothing is due; what each won."""
    won: list[list[tuple[str, int]]] = [[], []]
    start = threading.Barrier(2)

    def deliverer(mine):
        start.wait()
        while True:
            with transaction(sessions) as db:
                claimed = claim_due(db, limit=3, lease_seconds=600)
            if not claimed:
                return
            mine += [(c.delivery_id, c.attempt) for c in claimed]

    threads = [threading.Thread(target=deliverer, args=(won[i],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won[0] + won[1]


def test_two_deliverers_never_claim_the_same_attempt(settings, sessions):
    _, endpoint_id = _register(sessions, settings, "http://127.0.0.1:9/hook")
    owed = _owe(sessions, endpoint_id, count=40)

    first = _claim_in_two_threads(sessions)
    assert sorted(first) == sorted((delivery_id, 1) for delivery_id in owed)
    with transaction(sessions) as db:  # leased: not due again while an attempt is out
        assert claim_due(db, limit=100, lease_seconds=600) == []

    _expire_leases(sessions)  # the deliverers died: the next attempt goes out once
    second = _claim_in_two_threads(sessions)
    assert sorted(second) == sorted((delivery_id, 2) for delivery_id in owed)


def test_a_deliverer_past_its_lease_cannot_record_over_the_next_attempt(settings, sessions):
    _, endpoint_id = _register(sessions, settings, "http://127.0.0.1:9/hook")
    _owe(sessions, endpoint_id)
    with transaction(sessions) as db:
        (stale,) = claim_due(db, limit=1, lease_seconds=600)
    _expire_leases(sessions)
    with transaction(sessions) as db:
        (current,) = claim_due(db, limit=1, lease_seconds=600)
    ok = Outcome(200, None, 5)
    with transaction(sessions) as db:
        assert not record_attempt(db, stale, ok, (0,))
        assert record_attempt(db, current, ok, (0,))
    with sessions() as db:
        assert [a.attempt for a in db.scalars(select(WebhookAttempt))] == [2]


def test_a_failing_receiver_is_retried_on_the_schedule_then_given_up(settings, sessions):
    with receiver(500, 503, 500, 500) as hook:
        team, endpoint_id = _register(sessions, settings, hook.url)
        (owed,) = _owe(sessions, endpoint_id)
        # schedule (0, 0): two retries, each due at once; then the delivery is failed
        assert [deliver_due(sessions, settings) for _ in range(4)] == [1, 1, 1, 0]
        assert len(hook.received) == 3
        assert {r.headers["webhook-id"] for r in hook.received} == {owed}
    with sessions() as db:
        endpoint = get_webhook(db=db, team=team, webhook_id=endpoint_id)
        ((delivery, attempts),), _ = list_deliveries(db=db, endpoint=endpoint, limit=10)
    assert delivery.state == DeliveryState.FAILED
    assert [(a.attempt, a.status_code) for a in attempts] == [(1, 500), (2, 503), (3, 500)]
    assert attempts[1].error == "HTTP 503: ok"


def test_a_delivered_event_is_sent_once(settings, sessions):
    with receiver() as hook:
        _, endpoint_id = _register(sessions, settings, hook.url)
        _owe(sessions, endpoint_id)
        assert [deliver_due(sessions, settings) for _ in range(2)] == [1, 0]
        assert len(hook.received) == 1


def test_nothing_is_sent_to_a_deleted_endpoint(settings, sessions):
    with receiver() as hook:
        team, endpoint_id = _register(sessions, settings, hook.url)
        _owe(sessions, endpoint_id, count=3)
        with transaction(sessions) as db:
            delete_webhook(db=db, team=team, webhook_id=endpoint_id)
        assert deliver_due(sessions, settings) == 0
        assert hook.received == []
    with sessions() as db:
        assert db.scalars(select(WebhookDelivery)).all() == []


def test_the_target_is_checked_again_before_each_attempt(settings, sessions):
    with receiver() as hook:
        team, endpoint_id = _register(sessions, settings, hook.url)  # loopback allowed then
        _owe(sessions, endpoint_id)
        stricter = settings.model_copy(update={"webhook_allow_private": False})
        assert deliver_due(sessions, stricter) == 1
        assert hook.received == []
    with sessions() as db:
        endpoint = get_webhook(db=db, team=team, webhook_id=endpoint_id)
        ((delivery, attempts),), _ = list_deliveries(db=db, endpoint=endpoint, limit=10)
    assert attempts[0].status_code is None
    assert attempts[0].error.startswith("refused: 127.0.0.1 resolves to 127.0.0.1, a loopback")
    assert delivery.state == DeliveryState.PENDING  # retried on the schedule meanwhile


def test_redirects_are_not_followed(settings, sessions):
    with receiver() as elsewhere, receiver(307) as hook:
        hook.location = elsewhere.url
        team, endpoint_id = _register(sessions, settings, hook.url)
        _owe(sessions, endpoint_id)
        assert deliver_due(sessions, settings) == 1
        assert len(hook.received) == 1 and elsewhere.received == []
    with sessions() as db:
        endpoint = get_webhook(db=db, team=team, webhook_id=endpoint_id)
        ((delivery, attempts),), _ = list_deliveries(db=db, endpoint=endpoint, limit=10)
    assert attempts[0].status_code == 307 and attempts[0].error.startswith("HTTP 307")
    assert delivery.state == DeliveryState.PENDING  # a failed attempt, retried


def _lease_expired(sessions, job_id):
    """By the database's clock, which is what the reaper reads."""
    with sessions() as db:
        return db.scalar(select(Job.lease_expires_at < db_now()).where(Job.id == job_id))


def _owed(sessions):
    with sessions() as db:
        return [(d.event_type, json.loads(d.body)) for d in db.scalars(select(WebhookDelivery))]


def test_a_job_cancelled_while_queued_or_failed_by_the_reaper_is_owed(settings, sessions):
    team, _ = _register(
        sessions, settings, "http://127.0.0.1:9/hook", events=("job.cancelled", "job.failed")
    )
    cancelled = insert_job(sessions, team_id=team.id, max_attempts=1)
    cancel_job(sessions=sessions, team=team, job_id=cancelled)
    ((event, payload),) = _owed(sessions)
    assert event == payload["type"] == "job.cancelled"
    assert payload["data"]["id"] == cancelled and payload["data"]["status"] == "cancelled"

    lost = insert_job(sessions, team_id=team.id, max_attempts=1)
    with transaction(sessions) as db:
        claim_job(db, job_id=lost, owner="w1", lease_ttl=0.2)
    wait_for(lambda: _lease_expired(sessions, lost), timeout=30, what="the lease to expire")
    with transaction(sessions) as db:
        assert reap_expired_leases(db) == [(lost, JobState.FAILED)]
    (event, payload), *_ = [o for o in _owed(sessions) if o[1]["data"]["id"] == lost]
    assert event == "job.failed" and payload["data"]["error"]["code"] == "worker_lost"
