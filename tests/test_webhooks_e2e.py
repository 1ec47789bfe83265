"""Webhooks end to end: a real worker runs a job, beat delivers to a receiver on loopback.

Each deployment (embedded: SQLite and a filesystem broker; production: PostgreSQL and
Redis) runs `tuneq worker` and `tuneq beat` processes; the receiver is a real HTTP server
and checks signatures with its own hmac code. Loopback is allowed explicitly, and the
retry schedule is short, through the deployment's settings.
"""

from __future__ import annotations

import json
import signal

import pytest

from tests.api_helpers import TRAIN_ROWS, job_spec, upload
from tests.infra import (
    drop_postgres_database,
    fresh_postgres_database,
    postgres_url,
    redis_url,
    require,
)
from tests.service_fixtures import auth
from tests.stack import Stack, wait_for
from tests.webhook_receiver import receiver, signature_is_valid

pytestmark = pytest.mark.e2e

PARKED = "tiny-llama-parked"  # its queue has no worker: its jobs stay queued until cancelled


@pytest.fixture(scope="module", params=["embedded", "production"])
def stack(request, tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp(f"webhooks-{request.param}")
    source = {"type": "local", "path": str(tiny_model_dir)}
    registry = home / "models.json"
    registry.write_text(
        json.dumps(
            {
                "models": {
                    "tiny-llama": {"source": source, "tasks": ["causal_lm"]},
                    PARKED: {"source": source, "tasks": ["causal_lm"], "queue": "parked"},
                }
            }
        )
    )
    overrides = {
        "model_registry": str(registry),
        "relay_interval_seconds": 1.0,
        "estimated_tokens_per_second": 1000.0,
        "webhook_allow_private": "true",
        "webhook_retry_schedule_seconds": "1,1,1",
        "webhook_poll_seconds": 0.5,
    }
    database = None
    if request.param == "production":
        database = fresh_postgres_database(require(postgres_url))
        overrides |= {"database_url": database, "broker_url": require(redis_url)}
    deployment = Stack(request.param, home, overrides)
    deployment.setup()
    deployment.start("beat")
    yield deployment
    deployment.stop_all()
    if database is not None:
        drop_postgres_database(database)


@pytest.fixture
def key(stack, request):
    """A team of its own for each test: another test's endpoints are not this one's."""
    return stack.team_key(request.node.name)


def _register(api, key, url, *events):
    response = api.post("/webhooks", headers=auth(key), json={"url": url, "events": list(events)})
    assert response.status_code == 201, response.text
    return response.json()


def _deliveries(api, key, webhook_id):
    response = api.get(f"/webhooks/{webhook_id}/deliveries", headers=auth(key))
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _parked_job_cancelled(api, key):
    """A job no worker takes, cancelled while it waits in the queue."""
    training = upload(api, key, TRAIN_ROWS)
    created = api.post("/jobs", headers=auth(key), json=job_spec(training, model=PARKED))
    assert created.status_code == 201, created.text
    cancelled = api.post(f"/jobs/{created.json()['id']}/cancel", headers=auth(key))
    assert cancelled.json()["status"] == "cancelled"
    return cancelled.json()


def test_a_job_run_by_a_worker_announces_its_checkpoints_and_success_signed(stack, api, key):
    worker = stack.start("worker")
    try:
        with receiver() as hook:
            webhook = _register(api, key, hook.url, "job.succeeded", "job.checkpoint")
            training = upload(api, key, TRAIN_ROWS)
            spec = job_spec(training)
            spec["hyperparameters"] |= {"checkpoint_every_steps": 2}
            job_id = api.post("/jobs", headers=auth(key), json=spec).json()["id"]
            wait_for(
                lambda: any(r.json()["type"] == "job.succeeded" for r in hook.received),
                timeout=180,
                what="the job.succeeded delivery",
            )
            received = list(hook.received)
    finally:
        stack.kill(worker, signal.SIGTERM)

    job = api.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert job["status"] == "succeeded"
    for request in received:
        assert signature_is_valid(webhook["secret"], request), request.headers
        assert request.headers["content-type"] == "application/json"
    succeeded = [r for r in received if r.json()["type"] == "job.succeeded"]
    assert len(succeeded) == 1
    assert succeeded[0].json()["data"] == job  # the job as GET /jobs/{id} shows it
    assert succeeded[0].json()["timestamp"].endswith("Z")

    checkpoints = api.get(f"/jobs/{job_id}/checkpoints", headers=auth(key)).json()["data"]
    announced = [r.json()["data"] for r in received if r.json()["type"] == "job.checkpoint"]
    # deliveries are concurrent: receivers order them by the payload, not by arrival
    assert sorted(a["checkpoint"]["step"] for a in announced) == [c["step"] for c in checkpoints]
    assert all(a["id"] == job_id and a["status"] == "running" for a in announced)

    deliveries = _deliveries(api, key, webhook["id"])
    assert {d["id"] for d in deliveries} == {r.headers["webhook-id"] for r in received}
    assert all(d["status"] == "succeeded" and d["job_id"] == job_id for d in deliveries)
    assert all([a["status_code"] for a in d["attempts"]] == [200] for d in deliveries)


def test_a_receiver_that_fails_twice_gets_the_delivery_on_the_third_try(stack, api, key):
    with receiver(500, 500) as hook:
        webhook = _register(api, key, hook.url, "job.cancelled")
        job = _parked_job_cancelled(api, key)
        tries = hook.wait_for(3)
        assert len({r.headers["webhook-id"] for r in tries}) == 1  # one delivery, retried
        assert all(signature_is_valid(webhook["secret"], r) for r in tries)
        assert all(r.json() == tries[0].json() for r in tries)  # the same body each time
        assert tries[0].json()["type"] == "job.cancelled"
        assert tries[0].json()["data"]["id"] == job["id"]
        assert tries[0].json()["data"]["status"] == "cancelled"

        delivery = wait_for(
            lambda: [d for d in _deliveries(api, key, webhook["id"]) if d["status"] != "pending"],
            timeout=30,
            what="the third attempt to be recorded",
        )[0]
    assert delivery["id"] == tries[0].headers["webhook-id"]
    assert delivery["status"] == "succeeded" and delivery["type"] == "job.cancelled"
    attempts = delivery["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["status_code"] for a in attempts] == [500, 500, 200]
    assert [a["error"] is None for a in attempts] == [False, False, True]
    assert attempts[0]["error"].startswith("HTTP 500")


def test_a_deleted_endpoint_gets_nothing(stack, api, key):
    with receiver() as kept, receiver() as deleted:
        keep = _register(api, key, kept.url, "job.cancelled")
        gone = _register(api, key, deleted.url, "job.cancelled")
        assert api.delete(f"/webhooks/{gone['id']}", headers=auth(key)).json()["deleted"]
        job = _parked_job_cancelled(api, key)
        (request,) = kept.wait_for(1)
        assert request.json()["data"]["id"] == job["id"]
        assert signature_is_valid(keep["secret"], request)
        assert deleted.received == []
    assert api.get(f"/webhooks/{gone['id']}/deliveries", headers=auth(key)).status_code == 404


def test_a_running_job_cancelled_is_announced_by_its_worker(stack, api, key):
    worker = stack.start("worker", "worker-cancel")
    try:
        with receiver() as hook:
            webhook = _register(api, key, hook.url, "job.cancelled")
            training = upload(api, key, TRAIN_ROWS * 10)
            spec = job_spec(training)
            spec["hyperparameters"] |= {"n_epochs": 50}
            job_id = api.post("/jobs", headers=auth(key), json=spec).json()["id"]
            wait_for(
                lambda: (
                    (api.get(f"/jobs/{job_id}", headers=auth(key)).json()["progress"] or {}).get(
                        "step", 0
                    )
                    >= 1
                ),
                timeout=120,
                what="the job to be training",
            )
            cancelling = api.post(f"/jobs/{job_id}/cancel", headers=auth(key)).json()
            assert cancelling["status"] == "cancelling"  # the worker stops it and says so
            (request,) = hook.wait_for(1)
    finally:
        stack.kill(worker, signal.SIGTERM)
    assert signature_is_valid(webhook["secret"], request)
    payload = request.json()
    assert payload["type"] == "job.cancelled" and payload["data"]["id"] == job_id
    assert payload["data"]["status"] == "cancelled" and payload["data"]["attempt"] == 1
