"""`GET /jobs/{id}/diagnostics`, the SDK's `jobs.diagnostics` and `tuneq jobs diagnostics`
on a real deployment (SQLite and PostgreSQL, the API over HTTP), with the job run by the
worker's own code (`JobRunner`) in this process on the tiny Llama.

The data makes two validation lines hard (answers of random letters among sums the model
learns), so the lines the API names can be checked.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from tests.api_helpers import assert_problem, deployment, job_spec, upload
from tests.client_servers import serve_app
from tests.conftest import chat
from tests.service_fixtures import api_client, auth, new_team_key, run_cli
from tuneq.client import Client, Diagnostics, TuneqAPIError
from tuneq.db import make_engine, make_sessionmaker, transaction
from tuneq.jobs.models import Job
from tuneq.jobs.states import JobState
from tuneq.settings import Settings

HARD_LINES = {2, 5}
_rng = random.Random(0)
TRAIN = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(24)]
VALIDATION = [
    chat(f"What is {i} plus {i}?", "".join(_rng.choice("qxzjvkwy ") for _ in range(40)))
    if i - 29 in HARD_LINES
    else chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.")
    for i in range(30, 38)
]


@dataclass
class Finished:
    settings: Settings
    client: TestClient
    url: str
    key: str
    other_key: str
    job_id: str
    queued_job_id: str


def _run_job(settings: Settings, job_id: str) -> str:
    """The job, run by the worker's code in this process."""
    from peft_engine.models import load_registry
    from tuneq.db import make_engine, make_sessionmaker
    from tuneq.storage import open_store
    from worker.runner import JobRunner

    engine = make_engine(settings.resolved_database_url)
    try:
        runner = JobRunner(
            settings,
            make_sessionmaker(engine),
            open_store(settings),
            load_registry(settings.model_registry),
        )
        return runner.run(job_id)
    finally:
        engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def finished(request, tmp_path_factory, tiny_registry_file) -> Iterator[Finished]:
    home = tmp_path_factory.mktemp(f"diagnostics-{request.param}")
    with deployment(request.param, home, tiny_registry_file) as settings:
        key, other_key = new_team_key(settings, "diag"), new_team_key(settings, "others")
        with api_client(settings) as client, serve_app(settings) as url:
            train, validation = upload(client, key, TRAIN), upload(client, key, VALIDATION)
            spec = job_spec(train, validation_file=validation)
            spec["hyperparameters"] |= {"n_epochs": 3, "learning_rate": 3e-3, "eval_every_steps": 9}
            created = client.post("/jobs", headers=auth(key), json=spec)
            queued = client.post("/jobs", headers=auth(key), json=job_spec(train))
            assert created.status_code == queued.status_code == 201, created.text
            job_id = created.json()["id"]
            assert _run_job(settings, job_id) == "succeeded"
            yield Finished(settings, client, url, key, other_key, job_id, queued.json()["id"])


def _get(finished: Finished, job_id: str, key: str | None = None) -> Any:
    return finished.client.get(f"/jobs/{job_id}/diagnostics", headers=auth(key or finished.key))


def test_the_diagnostics_name_the_hard_validation_lines(finished):
    response = _get(finished, finished.job_id)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "job.diagnostics" and body["job_id"] == finished.job_id
    worst = [row for row in body["data"] if row["kind"] == "worst_validation"]
    assert {row["line"] for row in worst[:2]} == HARD_LINES
    assert all(row["file"] == "validation_file" for row in worst)
    assert worst[0]["preview"].startswith(f"user: What is {29 + worst[0]['line']} plus")
    hardest = [row for row in body["data"] if row["kind"] == "hardest_training"]
    assert hardest and all(row["file"] == "training_file" for row in hardest)
    job = finished.client.get(f"/jobs/{finished.job_id}", headers=auth(finished.key)).json()
    assert body["summary"] == job["result"]["diagnostics"]


def test_the_diagnostics_are_an_artifact_too(finished):
    a = auth(finished.key)
    artifacts = finished.client.get(f"/jobs/{finished.job_id}/artifacts", headers=a).json()
    listed = {row["name"]: row for row in artifacts["data"]}
    assert listed["diagnostics.jsonl"]["kind"] == "diagnostics"

    download = finished.client.get(
        f"/jobs/{finished.job_id}/artifacts/diagnostics.jsonl", headers=a
    )

    assert download.status_code == 200
    assert download.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in download.text.splitlines()]
    assert rows == _get(finished, finished.job_id).json()["data"]


def test_before_the_job_has_a_result_it_is_a_409(finished):
    body = assert_problem(_get(finished, finished.queued_job_id), 409)

    assert body["code"] == "job_not_finished" and body["param"] == "job_id"


def test_a_job_that_ran_before_diagnostics_were_recorded_is_a_409_saying_so(finished):
    # A job that succeeded with an older engine: a result, and no diagnostics.jsonl.
    train = upload(finished.client, finished.key, TRAIN)
    created = finished.client.post("/jobs", headers=auth(finished.key), json=job_spec(train))
    assert created.status_code == 201, created.text
    old_job = created.json()["id"]
    engine = make_engine(finished.settings.resolved_database_url)
    try:
        with transaction(make_sessionmaker(engine)) as db:
            db.execute(
                update(Job)
                .where(Job.id == old_job)
                .values(state=JobState.SUCCEEDED, result={"best_step": 9})
            )
    finally:
        engine.dispose()

    body = assert_problem(_get(finished, old_job), 409)

    assert body["code"] == "diagnostics_unavailable" and body["param"] == "job_id"
    assert body["type"].endswith("/diagnostics_unavailable")
    assert "ran before per-example diagnostics were recorded" in body["detail"]


def test_another_teams_job_is_a_404(finished):
    body = assert_problem(_get(finished, finished.job_id, finished.other_key), 404)

    assert body["param"] == "job_id"


def test_the_sdk_and_the_cli_show_them(finished):
    with Client(finished.url, finished.key) as client:
        diagnostics = client.jobs.diagnostics(finished.job_id)
        with pytest.raises(TuneqAPIError) as not_yet:
            client.jobs.diagnostics(finished.queued_job_id)
    assert isinstance(diagnostics, Diagnostics)
    assert {row["line"] for row in diagnostics.worst_validation[:2]} == HARD_LINES
    assert diagnostics.confused_labels == [] and diagnostics.hardest_training
    assert (not_yet.value.status, not_yet.value.code) == (409, "job_not_finished")

    env = {"TUNEQ_URL": finished.url, "TUNEQ_API_KEY": finished.key}
    shown = run_cli(finished.settings.home, "jobs", "diagnostics", finished.job_id, **env)

    assert shown.returncode == 0, shown.stderr
    assert "worst validation examples (validation_file)" in shown.stdout
    assert "hardest training examples (training_file)" in shown.stdout
    first = shown.stdout.splitlines()[2].split()  # the title, the header, the worst row
    assert int(first[0]) in HARD_LINES
