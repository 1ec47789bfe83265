"""Bounded runtime: `max_runtime_seconds` in the job spec, with an operator's default and cap.
The engine stops at the limit, keeps its best weights as the output; the worker keeps the
adapter and the checkpoints and fails the job `max_runtime_exceeded`."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from peft_engine import DataPaths, train
from peft_engine.models import load_registry
from tests.api_helpers import assert_problem, deployed_api, job_spec, upload
from tests.conftest import chat, write_jsonl
from tests.service_fixtures import auth
from tests.stack import all_events, job_ended, running_stack
from tuneq.db import make_engine
from tuneq.jobs.models import Job

ROWS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(16)]
# Far more steps than a second holds on any machine (a step of the tiny model takes
# milliseconds): the limit, not the last step, ends these runs.
LONG = {"n_epochs": 100, "batch_size": 1, "max_seq_length": 64, "eval_every_steps": 50,
        "checkpoint_every_steps": 20, "early_stopping": None}  # fmt: skip


def test_the_engine_stops_at_the_limit_and_keeps_its_best_weights(
    tmp_path, tiny_registry_file, cache_dir
):
    spec = {"model": "tiny-llama", "max_runtime_seconds": 1, "validation_split": 0.25,
            "method": {"type": "lora", "r": 4, "alpha": 8}, "hyperparameters": LONG}  # fmt: skip
    events = []
    from peft_engine.hooks import Hooks

    result = train(
        spec,
        tmp_path / "run",
        Hooks(on_event=events.append),
        data=DataPaths(write_jsonl(tmp_path / "train.jsonl", ROWS)),
        registry=load_registry(tiny_registry_file),
        cache_dir=cache_dir,
    )

    assert result.status == "succeeded" and result.result["max_runtime_reached"] is True
    # loading counts too: on a busy machine the limit may come before the first step
    assert result.result["steps"] < result.result["total_steps"] == 1200
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    assert any("max_runtime_seconds (1 s) reached" in e.message for e in events)


@pytest.fixture(scope="module")
def policed(tmp_path_factory, tiny_registry_file):
    """The real app with a default of 600 s and a cap of 3600 s."""
    home = tmp_path_factory.mktemp("runtime")
    with deployed_api("sqlite", home, tiny_registry_file, "team") as api:
        api.client.app.state.settings = api.settings.model_copy(
            update={"max_runtime_seconds": 600, "max_runtime_seconds_cap": 3600}
        )
        yield api


def _stored_spec(api, job_id):
    engine = make_engine(api.settings.resolved_database_url)
    try:
        with engine.connect() as connection:
            return connection.scalar(select(Job.spec).where(Job.id == job_id))
    finally:
        engine.dispose()


def test_the_operator_default_and_cap_apply_at_submission(policed):
    key = policed.keys[0]
    training_file = upload(policed.client, key, ROWS)
    post = lambda spec: policed.client.post("/jobs", headers=auth(key), json=spec)  # noqa: E731

    problem = assert_problem(post(job_spec(training_file, max_runtime_seconds=3601)), 422)
    assert problem["errors"][0]["field"] == "max_runtime_seconds" and "3600" in problem["detail"]

    asked = post(job_spec(training_file, max_runtime_seconds=120))
    assert asked.status_code == 201, asked.text
    assert _stored_spec(policed, asked.json()["id"])["max_runtime_seconds"] == 120
    unset = post(job_spec(training_file))
    assert unset.status_code == 201, unset.text
    assert _stored_spec(policed, unset.json()["id"])["max_runtime_seconds"] == 600
    # the job's document shows the limit that applies, and how many attempts it gets
    shown = policed.client.get(f"/jobs/{unset.json()['id']}", headers=auth(key)).json()
    assert shown["max_runtime_seconds"] == 600 and shown["max_attempts"] == 3
    assert asked.json()["max_runtime_seconds"] == 120


def test_a_job_out_of_time_fails_with_its_adapter_and_checkpoints_kept(
    tmp_path, tiny_registry_file
):
    overrides = {"model_registry": str(tiny_registry_file)}
    with running_stack("embedded", tmp_path / "stack", overrides) as stack:
        stack.start("worker")
        key = stack.team_key("hurried")
        with stack.client() as api:
            spec = job_spec(upload(api, key, ROWS), validation_split=0.25, max_runtime_seconds=3)
            spec["hyperparameters"] = LONG
            job_id = api.post("/jobs", headers=auth(key), json=spec).json()["id"]
            job = job_ended(api, key, job_id)
            artifacts = api.get(f"/jobs/{job_id}/artifacts", headers=auth(key)).json()["data"]
            adapter = api.get(f"/jobs/{job_id}/artifacts/adapter.tar.gz", headers=auth(key))
            events = all_events(api, key, job_id)

    assert job["status"] == "failed", json.dumps(job)[:2000]
    assert job["error"]["code"] == "max_runtime_exceeded"
    assert job["error"]["param"] == "max_runtime_seconds" and "(3 s)" in job["error"]["message"]
    assert job["result"]["steps"] < job["result"]["total_steps"]
    assert adapter.status_code == 200 and len(adapter.content) > 0
    names = {a["name"] for a in artifacts}
    assert "adapter.tar.gz" in names
    assert any(n.startswith("checkpoint-") for n in names) == (job["result"]["steps"] > 20)
    assert any(e["message"].startswith("job failed: the job ran for its") for e in events)
