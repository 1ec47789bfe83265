"""End to end, on real components: the API, a `tuneq worker` and a `tuneq beat` process.

Two deployments run the same tests: embedded (SQLite, a filesystem broker, a local store)
and production (PostgreSQL, Redis, S3 over HTTP from moto's server). Nothing of ours is
mocked; the model is a tiny random Llama so that training takes seconds.
"""

from __future__ import annotations

import io
import json
import signal
import tarfile
import time

import pytest

from tests.api_helpers import job_spec, jsonl
from tests.conftest import chat, logits_from_plain_peft
from tests.service_fixtures import auth
from tests.stack import running_stack, wait_for
from tuneq.queue import make_celery, publish_run_job

pytestmark = pytest.mark.e2e

TRAIN = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(40)]
VALIDATION = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(40, 48)]


@pytest.fixture(scope="module", params=["embedded", "production"])
def stack(request, tmp_path_factory, tiny_registry_file):
    home = tmp_path_factory.mktemp(f"stack-{request.param}")
    overrides = {
        "model_registry": str(tiny_registry_file),
        "lease_ttl_seconds": 3.0,
        "reaper_interval_seconds": 1.0,
        "relay_interval_seconds": 1.0,
        "estimated_tokens_per_second": 1000.0,
    }
    with running_stack(request.param, home, overrides) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def key(stack):
    return stack.team_key("e2e")


def _upload(api, key, rows, name="train.jsonl"):
    response = api.post(
        "/files",
        headers=auth(key),
        files={"file": (name, jsonl(rows))},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _spec(training_file, validation_file=None, **hyperparameters):
    spec = job_spec(
        training_file, validation_file=validation_file, suffix="adder", metadata={"team": "e2e"}
    )
    spec["hyperparameters"] |= {"eval_every_steps": 5, "checkpoint_every_steps": 5}
    spec["hyperparameters"] |= hyperparameters
    return spec


def _job(api, key, job_id):
    response = api.get(f"/jobs/{job_id}", headers=auth(key))
    assert response.status_code == 200, response.text
    return response.json()


def _events(api, key, job_id):
    """All of a job's events, oldest first, page by page (a long job has more than a page:
    a metrics event a step)."""
    events, after = [], None
    while True:
        params = {"limit": 100} | ({"after": after} if after is not None else {})
        page = api.get(f"/jobs/{job_id}/events", params=params, headers=auth(key)).json()
        events += page["data"]
        if not page["has_more"]:
            return events
        after = page["data"][-1]["id"]


def _wait_status(api, key, job_id, statuses, timeout=180):
    return wait_for(
        lambda: (job := _job(api, key, job_id))["status"] in statuses and job,
        timeout=timeout,
        what=f"job {job_id} to reach {statuses}",
    )


def test_job_runs_end_to_end(stack, worker, api, key, tmp_path, tiny_model_dir):
    train = _upload(api, key, TRAIN)
    validation = _upload(api, key, VALIDATION, "validation.jsonl")

    dry = api.post("/jobs?dry_run=true", headers=auth(key), json=_spec(train, validation))
    assert dry.status_code == 200, dry.text
    assert dry.json()["estimate"]["total_steps"] == 20 and dry.json()["estimate"]["tokens_exact"]
    assert dry.json()["estimate"]["basis"].startswith("default:")  # no job of the model yet
    assert api.get("/jobs", headers=auth(key)).json()["data"] == []  # a dry run creates nothing

    created = api.post("/jobs", headers=auth(key), json=_spec(train, validation))
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    assert created.json()["status"] == "queued"
    assert created.json()["hyperparameters"]["total_steps"] == 20

    job = _wait_status(api, key, job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded", (job, stack.log("worker")[-3000:])
    assert job["progress"]["step"] == 20 and job["progress"]["percent"] == 100.0
    assert job["trained_tokens"] > 0 and job["attempt"] == 1
    assert (
        job["result"]["metrics"]["best"]["eval_loss"]
        < job["result"]["metrics"]["initial"]["eval_loss"]
    )

    # the worker recorded the job's speed: the next dry run of the model is estimated with it
    again = api.post("/jobs?dry_run=true", headers=auth(key), json=_spec(train, validation))
    assert again.json()["estimate"]["basis"].startswith(
        "measured: 1 causal_lm lora job of tiny-llama"
    )

    metrics = api.get(f"/jobs/{job_id}/metrics", headers=auth(key)).json()
    assert [p["step"] for p in metrics["train"]] == list(range(1, 21))
    assert {"train_loss", "learning_rate", "grad_norm", "tokens_per_second"} <= set(
        metrics["train"][0]
    )
    assert [p["step"] for p in metrics["eval"]] == [0, 5, 10, 15, 20]

    events = _events(api, key, job_id)
    kinds = {e["type"] for e in events}
    assert kinds == {"message", "metrics"}
    messages = [e["message"] for e in events if e["type"] == "message"]
    assert any("eval (base model)" in m for m in messages) and messages[-1] == "job succeeded"

    checkpoints = api.get(f"/jobs/{job_id}/checkpoints", headers=auth(key)).json()["data"]
    assert [c["step"] for c in checkpoints] == [5, 10, 15]

    artifacts = {
        a["name"]: a for a in api.get(f"/jobs/{job_id}/artifacts", headers=auth(key)).json()["data"]
    }
    assert set(artifacts) == {
        "adapter.tar.gz",
        "diagnostics.jsonl",
        "checkpoint-5.tar.gz",
        "checkpoint-10.tar.gz",
        "checkpoint-15.tar.gz",
    }
    adapter_dir = _download(api, key, job_id, "adapter.tar.gz", tmp_path / "adapter")
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert json.loads((adapter_dir / "result.json").read_text())["steps"] == 20

    # the adapter loads with plain peft and changes the model's output
    import torch

    ids = torch.tensor([[1, 5, 9, 13, 2]])
    (tmp_path / "scratch").mkdir()
    tuned = logits_from_plain_peft(tiny_model_dir, adapter_dir, ids, tmp_path / "scratch")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, tuned)

    checkpoint_dir = _download(api, key, job_id, "checkpoint-10.tar.gz", tmp_path / "ckpt")
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tuneq_model.json",
    ]


def _download(api, key, job_id, name, target):
    response = api.get(
        f"/jobs/{job_id}/artifacts/{name}", headers=auth(key), follow_redirects=False
    )
    if response.status_code == 307:  # S3: a short-lived presigned URL, fetched without our key
        import httpx

        location = response.headers["location"]
        assert "X-Amz-Expires=" in location
        response = httpx.get(location)
    assert response.status_code == 200, response.text
    target.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
        archive.extractall(target, filter="data")
    return target


def _long_job(api, key, **hyperparameters):
    train = _upload(api, key, TRAIN * 5)
    spec = _spec(train, n_epochs=20, checkpoint_every_steps=1000, eval_every_steps=1000)
    spec["hyperparameters"] |= hyperparameters
    spec["validation_split"] = 0.0
    created = api.post("/jobs", headers=auth(key), json=spec)
    assert created.status_code == 201, created.text
    return created.json()["id"]


def _training_job(api, key, **hyperparameters):
    """A long job, once it has trained three steps."""
    job_id = _long_job(api, key, **hyperparameters)
    wait_for(
        lambda: (_job(api, key, job_id)["progress"] or {}).get("step", 0) >= 3,
        timeout=120,
        what="the job to be training",
    )
    return job_id


def test_cancel_queued_and_running_jobs(stack, worker, api, key):
    running = _long_job(api, key)
    wait_for(
        lambda: (_job(api, key, running)["progress"] or {}).get("step", 0) >= 2,
        timeout=120,
        what="the long job to be training",
    )
    queued = _long_job(api, key)  # the only worker is busy: this one waits in the queue
    cancelled = api.post(f"/jobs/{queued}/cancel", headers=auth(key))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    response = api.post(f"/jobs/{running}/cancel", headers=auth(key))
    assert response.json()["status"] == "cancelling"
    # The next lease renewal (every lease_ttl/3 = 1 s here) reads the flag and the engine
    # stops before its next step; the wait's limit is only there so a hang fails the test.
    job = _wait_status(api, key, running, {"cancelled"}, timeout=60)
    assert job["progress"]["step"] < job["hyperparameters"]["total_steps"]
    assert job["finished_at"] is not None and job["error"] is None

    # the queued one never ran, even though its message is still delivered to the worker
    time.sleep(2)
    never_ran = _job(api, key, queued)
    assert never_ran["status"] == "cancelled" and never_ran["attempt"] == 0
    assert never_ran["started_at"] is None


def test_duplicate_task_message_runs_the_job_once(stack, worker, api, key):
    train = _upload(api, key, TRAIN)
    job_id = api.post("/jobs", headers=auth(key), json=_spec(train)).json()["id"]
    celery = make_celery(stack.settings)
    for _ in range(3):  # the relay's message plus three more
        publish_run_job(celery, job_id)
    job = _wait_status(api, key, job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded" and job["attempt"] == 1
    time.sleep(2)  # let the duplicates arrive and be dropped
    events = _events(api, key, job_id)
    assert sum(e["message"].startswith("attempt ") for e in events) == 1
    assert _job(api, key, job_id)["attempt"] == 1


def test_pause_a_running_job_then_resume_where_it_stopped(stack, worker, api, key):
    job_id = _training_job(api, key, n_epochs=4)
    assert api.post(f"/jobs/{job_id}/pause", headers=auth(key)).status_code == 200
    paused = _wait_status(api, key, job_id, {"paused"}, timeout=60)
    stopped_at = paused["progress"]["step"]
    assert stopped_at < paused["hyperparameters"]["total_steps"]
    # the stop saved a checkpoint of the very step it stopped at
    steps = [
        c["step"] for c in api.get(f"/jobs/{job_id}/checkpoints", headers=auth(key)).json()["data"]
    ]
    assert steps[-1] == stopped_at

    resumed = api.post(f"/jobs/{job_id}/resume", headers=auth(key))
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    job = _wait_status(api, key, job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded" and job["attempt"] == 2
    events = [e["message"] for e in _events(api, key, job_id)]
    assert f"resuming from the checkpoint of step {stopped_at} (attempt 2)" in events
    train = api.get(f"/jobs/{job_id}/metrics", headers=auth(key)).json()["train"]
    assert [p["step"] for p in train] == list(range(1, job["hyperparameters"]["total_steps"] + 1))


def test_a_worker_asked_to_shut_down_hands_its_job_over(stack, worker, api, key):
    # Runs after the tests that need the module's worker: it stops that worker.
    job_id = _training_job(api, key, n_epochs=4)
    worker.send_signal(signal.SIGTERM)  # what `docker stop` and a deploy do
    assert worker.wait(timeout=60) == 0  # it did not wait for the job to finish
    handed_over = _job(api, key, job_id)
    assert handed_over["status"] == "queued"
    stopped_at = handed_over["progress"]["step"]
    assert stopped_at < handed_over["hyperparameters"]["total_steps"]

    replacement = stack.start("worker", "worker-after-shutdown")
    try:
        job = _wait_status(api, key, job_id, {"succeeded", "failed"})
    finally:
        stack.kill(replacement, signal.SIGTERM)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    events = [e["message"] for e in _events(api, key, job_id)]
    assert "worker shutting down; queued again" in events
    assert f"resuming from the checkpoint of step {stopped_at} (attempt 2)" in events


def test_worker_killed_mid_training_resumes_from_last_checkpoint(stack, api, key):
    worker = stack.start("worker", "worker-to-kill")
    train = _upload(api, key, TRAIN * 5)
    spec = _spec(train, n_epochs=10, checkpoint_every_steps=25, eval_every_steps=1000)
    spec["validation_split"] = 0.0
    job_id = api.post("/jobs", headers=auth(key), json=spec).json()["id"]
    total = _job(api, key, job_id)["hyperparameters"]["total_steps"]

    checkpoints = wait_for(
        lambda: api.get(f"/jobs/{job_id}/checkpoints", headers=auth(key)).json()["data"],
        timeout=180,
        interval=0.05,
        what="the first checkpoint",
    )
    stack.kill(worker)  # SIGKILL: no cleanup, the lease just stops being renewed
    killed_at = _job(api, key, job_id)["progress"]["step"]
    assert _job(api, key, job_id)["status"] == "running" and killed_at < total

    replacement = stack.start("worker", "worker-2")
    try:
        job = _wait_status(api, key, job_id, {"succeeded", "failed"})
    finally:
        stack.kill(replacement, signal.SIGTERM)
    assert job["status"] == "succeeded", (job, stack.log("worker-2")[-3000:])
    assert job["attempt"] == 2

    events = [e["message"] for e in _events(api, key, job_id)]
    resumed = [m for m in events if m.startswith("resuming from the checkpoint of step")]
    assert len(resumed) == 1, events
    resumed_step = int(resumed[0].split("step ")[1].split(" ")[0])
    assert resumed_step >= checkpoints[0]["step"] > 0  # not from zero
    metrics = api.get(f"/jobs/{job_id}/metrics", headers=auth(key)).json()
    assert [p["step"] for p in metrics["train"]] == list(range(1, total + 1))
