"""Quotas per team through the real app (SQLite and PostgreSQL): `GET /quota`, 429 at the
queued-jobs and GPU-seconds limits, 403 past the stored-bytes cap, nothing written by a
refused request, another team untouched; and `tuneq admin set-quota`/`show-quota`."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from tests.api_helpers import TRAIN_ROWS, assert_problem, deployed_api, job_spec, jsonl, upload
from tests.service_fixtures import TUNEQ_CLI, auth, cli_env, make_settings, migrate
from tuneq.db import make_sessionmaker, transaction, utcnow
from tuneq.models import File, Job, OutboxMessage, Team
from tuneq.quotas.cli import parse_bytes, parse_duration
from tuneq.quotas.service import set_quota


@pytest.fixture(params=["sqlite", "postgresql"])
def deployed(request, tmp_path, tiny_registry_file):
    with deployed_api(request.param, tmp_path, tiny_registry_file, "alpha", "beta") as api:
        yield api


def _set(deployed, team_name: str, **changes):
    with transaction(make_sessionmaker(deployed.engine)) as db:
        team = db.scalar(select(Team).where(Team.name == team_name))
        set_quota(db, team, changes)


def _count(deployed, model, *where) -> int:
    with deployed.engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(model).where(*where))


def test_quota_shows_defaults_then_the_operators_limits_and_the_usage(deployed):
    client, (alpha, _) = deployed.client, deployed.keys
    quota = client.get("/quota", headers=auth(alpha))
    assert quota.status_code == 200, quota.text
    body = quota.json()
    assert body["object"] == "quota" and body["team"] == "alpha"
    assert body["limits"] == {
        "running_jobs": None,
        "queued_jobs": None,
        "stored_bytes": None,
        "gpu_seconds": None,
        "gpu_window_seconds": 7 * 86400,
    }
    assert body["usage"] == {
        "running_jobs": 0,
        "queued_jobs": 0,
        "stored_bytes": 0,
        "gpu_seconds": 0,
    }

    training = upload(client, alpha, TRAIN_ROWS)
    assert client.post("/jobs", headers=auth(alpha), json=job_spec(training)).status_code == 201
    _set(deployed, "alpha", running_jobs=2, queued_jobs=5)
    body = client.get("/quota", headers=auth(alpha)).json()
    assert body["limits"]["running_jobs"] == 2 and body["limits"]["queued_jobs"] == 5
    assert body["usage"]["queued_jobs"] == 1
    assert body["usage"]["stored_bytes"] == len(jsonl(TRAIN_ROWS))
    assert client.get("/quota").status_code == 401


def test_queued_jobs_quota_answers_429_naming_it_and_writes_nothing(deployed):
    client, (alpha, beta) = deployed.client, deployed.keys
    _set(deployed, "alpha", queued_jobs=2)
    training = upload(client, alpha, TRAIN_ROWS)
    for _ in range(2):
        assert client.post("/jobs", headers=auth(alpha), json=job_spec(training)).status_code == 201
    before = (_count(deployed, Job), _count(deployed, OutboxMessage))

    refused = client.post("/jobs", headers=auth(alpha), json=job_spec(training))
    body = assert_problem(refused, 429)
    assert body["code"] == "quota_exceeded"
    assert (body["quota"], body["limit"], body["current"]) == ("queued_jobs", 2, 2)
    assert "queued_jobs" in body["detail"]
    assert (_count(deployed, Job), _count(deployed, OutboxMessage)) == before
    # a dry run is an estimate, not a job: still answered
    assert (
        client.post("/jobs?dry_run=true", headers=auth(alpha), json=job_spec(training)).status_code
        == 200
    )

    # another team is not held back by alpha's quota
    other = upload(client, beta, TRAIN_ROWS)
    assert client.post("/jobs", headers=auth(beta), json=job_spec(other)).status_code == 201

    # a job cancelled makes room
    first = client.get("/jobs", headers=auth(alpha)).json()["data"][0]["id"]
    assert client.post(f"/jobs/{first}/cancel", headers=auth(alpha)).status_code == 200
    assert client.post("/jobs", headers=auth(alpha), json=job_spec(training)).status_code == 201


def test_gpu_seconds_in_the_window_answer_429(deployed):
    client, (alpha, _) = deployed.client, deployed.keys
    training = upload(client, alpha, TRAIN_ROWS)
    job_id = client.post("/jobs", headers=auth(alpha), json=job_spec(training)).json()["id"]
    with transaction(make_sessionmaker(deployed.engine)) as db:  # it ran for an hour, 2 h ago
        job = db.get(Job, job_id)
        job.state, job.started_at = "succeeded", utcnow() - timedelta(hours=3)
        job.finished_at = utcnow() - timedelta(hours=2)
    _set(deployed, "alpha", gpu_seconds=3000, gpu_window_seconds=4 * 3600)
    body = assert_problem(client.post("/jobs", headers=auth(alpha), json=job_spec(training)), 429)
    assert body["quota"] == "gpu_seconds" and body["limit"] == 3000
    assert 3590 <= body["current"] <= 3610

    _set(deployed, "alpha", gpu_window_seconds=3600)  # the hour rolled out of the window
    assert client.post("/jobs", headers=auth(alpha), json=job_spec(training)).status_code == 201


def test_a_job_on_two_gpus_counts_two_device_seconds_a_second(deployed):
    client, (alpha, _) = deployed.client, deployed.keys
    training = upload(client, alpha, TRAIN_ROWS)
    spec = job_spec(training, resources={"gpus": 2})
    job_id = client.post("/jobs", headers=auth(alpha), json=spec).json()["id"]
    with transaction(make_sessionmaker(deployed.engine)) as db:  # it ran for half an hour
        job = db.get(Job, job_id)
        job.state, job.started_at = "succeeded", utcnow() - timedelta(hours=1)
        job.finished_at = utcnow() - timedelta(minutes=30)
    _set(deployed, "alpha", gpu_seconds=3000, gpu_window_seconds=4 * 3600)
    body = assert_problem(client.post("/jobs", headers=auth(alpha), json=job_spec(training)), 429)
    assert body["quota"] == "gpu_seconds"
    assert 3590 <= body["current"] <= 3610  # 1,800 s on 2 GPUs


def test_stored_bytes_cap_refuses_uploads_with_403_and_keeps_nothing(deployed):
    client, (alpha, beta) = deployed.client, deployed.keys
    size = len(jsonl(TRAIN_ROWS))
    _set(deployed, "alpha", stored_bytes=size + size // 2)
    upload(client, alpha, TRAIN_ROWS)  # fits
    stored = sorted(p.name for p in deployed.settings.resolved_store_dir.rglob("*") if p.is_file())

    refused = client.post(
        "/files", headers=auth(alpha), files={"file": ("t.jsonl", jsonl(TRAIN_ROWS))}
    )
    body = assert_problem(refused, 403)
    assert body["code"] == "storage_quota_exceeded"
    assert (body["quota"], body["limit"], body["current"]) == (
        "stored_bytes",
        size + size // 2,
        size,
    )
    assert _count(deployed, File) == 1
    after = sorted(p.name for p in deployed.settings.resolved_store_dir.rglob("*") if p.is_file())
    assert after == stored  # nothing half-written in the store

    upload(client, beta, TRAIN_ROWS)  # the other team's cap is its own

    _set(deployed, "alpha", stored_bytes=size)  # full to the byte: refused before reading
    refused = client.post("/files", headers=auth(alpha), files={"file": ("t.jsonl", b"x")})
    assert assert_problem(refused, 403)["current"] == size


def test_sizes_and_durations_read_as_an_operator_writes_them():
    assert parse_bytes("50GiB") == 50 * 1024**3
    assert parse_bytes("20GB") == parse_bytes("20g") == 20 * 1000**3
    assert parse_bytes("1234") == 1234
    assert (parse_duration("90m"), parse_duration("7d"), parse_duration("3600")) == (
        5400,
        604800,
        3600,
    )
    for bad in ("lots", "-5", "5x"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_admin_set_quota_and_show_quota(tmp_path):
    settings = make_settings(tmp_path)
    migrate(settings)
    env = cli_env(tmp_path)

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*TUNEQ_CLI, "admin", *args], env=env, capture_output=True, text=True)

    assert admin("create-team", "gamma").returncode == 0
    done = admin("set-quota", "--team", "gamma", "--running-jobs", "2", "--stored-bytes", "1GiB",
                 "--gpu-seconds", "10h", "--gpu-window", "1d")  # fmt: skip
    assert done.returncode == 0, done.stderr
    limits = json.loads(done.stdout)["limits"]
    assert limits == {
        "running_jobs": 2,
        "queued_jobs": None,
        "stored_bytes": 1024**3,
        "gpu_seconds": 36000,
        "gpu_window_seconds": 86400,
    }
    cleared = admin("set-quota", "--team", "gamma", "--running-jobs", "default")
    assert json.loads(cleared.stdout)["limits"]["running_jobs"] is None
    shown = json.loads(admin("show-quota", "--team", "gamma").stdout)
    assert shown["limits"]["stored_bytes"] == 1024**3 and shown["usage"]["queued_jobs"] == 0

    bad = admin("set-quota", "--team", "gamma", "--stored-bytes", "lots")
    assert bad.returncode != 0 and "--stored-bytes" in bad.stderr and "not a size" in bad.stderr
    nothing = admin("set-quota", "--team", "gamma")
    assert nothing.returncode != 0 and "at least one quota" in nothing.stderr
    unknown = admin("set-quota", "--team", "nobody", "--queued-jobs", "1")
    assert unknown.returncode == 2 and "no team named 'nobody'" in unknown.stderr
