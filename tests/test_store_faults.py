"""A store that fails transiently is retried in place by the worker (worker/retry.py): the
job goes on, and each retry is an event the user can read. What is not transient fails at
once. The real-stack test puts a TCP proxy that resets connections between the worker and
the S3 server (moto over HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from tests.api_helpers import job_spec, upload
from tests.conftest import chat
from tests.flaky_proxy import FlakyProxy
from tests.service_fixtures import auth
from tests.stack import Stack, all_events, job_ended, production_services, wait_for
from worker.retry import RetryPolicy, is_transient, retry_transient

ROWS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(16)]


def _client_error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


def test_what_counts_as_transient():
    assert is_transient(EndpointConnectionError(endpoint_url="http://s3"))
    assert is_transient(ConnectionResetError())
    assert is_transient(_client_error(503, "SlowDown"))
    assert is_transient(_client_error(500, "InternalError"))
    assert not is_transient(_client_error(404, "NoSuchKey"))
    assert not is_transient(_client_error(403, "AccessDenied"))
    assert not is_transient(ValueError("a bug"))
    try:  # wrapped by s3transfer, which raises its own error while handling the fault
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError:
            from s3transfer.exceptions import S3UploadFailedError

            raise S3UploadFailedError("Failed to upload") from None
    except S3UploadFailedError as wrapped:
        wrapped.__context__ = ConnectionResetError("reset")
        assert is_transient(wrapped)


def test_retries_back_off_within_the_cap_then_give_up():
    failures = iter([ConnectionResetError("1"), _client_error(503, "SlowDown")])

    def flaky() -> str:
        if (fault := next(failures, None)) is not None:
            raise fault
        return "done"

    told, slept = [], []
    policy = RetryPolicy(attempts=3, base_seconds=2.0, cap_seconds=3.0)
    result = retry_transient(
        flaky, what="store put_file x", policy=policy,
        report=lambda m, d: told.append((m, d)), sleep=slept.append,
    )  # fmt: skip
    assert result == "done"
    assert [d["try"] for _, d in told] == [2, 3] and all(d["tries"] == 3 for _, d in told)
    assert told[0][0].startswith("store put_file x failed (ConnectionResetError: 1)")
    assert 0 <= slept[0] <= 2.0 and 0 <= slept[1] <= 3.0  # 2 s, then 4 s capped at 3 s

    always = iter([ConnectionResetError(str(i)) for i in range(3)])

    def reset() -> None:
        raise next(always)

    with pytest.raises(ConnectionResetError, match="2"):  # the last fault, after 3 tries
        retry_transient(reset, what="x", policy=policy, report=lambda m, d: None, sleep=id)

    def bug() -> None:
        raise ValueError("bug")

    with pytest.raises(ValueError):  # not transient: raised at once, nothing told
        retry_transient(bug, what="x", policy=policy, report=lambda m, d: pytest.fail(m),
                        sleep=slept.append)  # fmt: skip


@contextmanager
def behind_a_flaky_proxy(
    home: Path, registry: Path, **overrides: Any
) -> Iterator[tuple[Stack, FlakyProxy]]:
    """A production stack (PostgreSQL, Redis, moto) whose S3 traffic goes through a
    FlakyProxy; beat running, no worker yet."""
    with production_services("tuneq-faults") as services:
        target = urlparse(services["s3_endpoint_url"])
        proxy = FlakyProxy((target.hostname, target.port))
        settings = services | {"s3_endpoint_url": proxy.url, "model_registry": str(registry)}
        stack = Stack("production", home, settings | overrides)
        stack.setup()
        try:
            stack.start("beat")
            yield stack, proxy
        finally:
            stack.stop_all()
            proxy.close()


def test_a_job_goes_on_through_a_store_that_resets_its_connections(tmp_path, tiny_registry_file):
    overrides = {"store_retry_base_seconds": 0.2, "relay_interval_seconds": 1.0}
    with behind_a_flaky_proxy(tmp_path / "stack", tiny_registry_file, **overrides) as (
        stack,
        proxy,
    ):
        key = stack.team_key("faulty")
        with stack.client() as api:
            spec = job_spec(upload(api, key, ROWS), validation_split=0.25)
            spec["hyperparameters"] |= {"checkpoint_every_steps": 2}
            job_id = api.post("/jobs", headers=auth(key), json=spec).json()["id"]
            # The worker's first store calls meet resets beyond boto3's own 5 tries.
            proxy.fail(7)
            stack.start("worker")
            job = job_ended(api, key, job_id)
            events = all_events(api, key, job_id)
    retries = [e for e in events if e["data"].get("code") == "transient_fault"]
    assert retries, [e["message"] for e in events]
    assert proxy.refused == 7
    assert all("retrying in" in e["message"] and e["level"] == "warning" for e in retries)
    assert job["status"] == "succeeded" and job["attempt"] == 1, job  # retried in place


def test_a_store_down_longer_than_the_retries_hands_the_job_back_then_fails_it(
    tmp_path, tiny_registry_file
):
    overrides = {
        "store_retries": 2,
        "store_retry_base_seconds": 0.05,
        "handback_delay_seconds": 1.0,
        "relay_interval_seconds": 0.5,
        "max_attempts": 2,
    }
    with behind_a_flaky_proxy(tmp_path / "stack", tiny_registry_file, **overrides) as (
        stack,
        proxy,
    ):
        key = stack.team_key("outage")
        with stack.client() as api:
            spec = job_spec(upload(api, key, ROWS), validation_split=0.25)
            created = [api.post("/jobs", headers=auth(key), json=spec).json()["id"]]
            proxy.fail(10**6)  # the store is down
            stack.start("worker")
            wait_for(
                lambda: any(
                    e["data"].get("code") == "handed_back" for e in all_events(api, key, created[0])
                ),
                timeout=120,
                what="a hand-back",
            )
            proxy.fail(0)  # the store is back: the next attempt resumes the job
            healed = job_ended(api, key, created[0])

            # Down for good: handed back once, then its last attempt fails it.
            created.append(api.post("/jobs", headers=auth(key), json=spec).json()["id"])
            proxy.fail(10**6)
            lost = job_ended(api, key, created[1])
            lost_events = all_events(api, key, created[1])
    assert healed["status"] == "succeeded" and healed["attempt"] == 2, healed
    assert lost["status"] == "failed" and lost["attempt"] == 2, lost
    assert lost["error"]["code"] == "infrastructure_unavailable"
    assert "attempt 2 of 2, the last, ended" in lost["error"]["message"]
    assert "a transient fault outlasted its 2 tries" in lost["error"]["message"]
    codes = [e["data"].get("code") for e in lost_events]
    assert codes.count("handed_back") == 1 and "transient_fault" in codes
