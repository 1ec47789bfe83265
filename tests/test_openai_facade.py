"""The official `openai` client drives a real deployment through the facade, end to end.

`tuneq api` serves HTTP on a port (uvicorn, in its own process), beside a `tuneq worker`
and a `tuneq beat`, on the embedded stack (SQLite, filesystem broker, local store); the
client is `OpenAI(base_url=URL + "/openai/v1", api_key=KEY)`, as a user would write it.
The model is the tiny random Llama of the test registry: a job trains in a few steps.
"""

from __future__ import annotations

import io
import tarfile

import httpx
import openai
import pytest

from tests.api_helpers import TRAIN_ROWS, jsonl
from tests.infra import _free_port
from tests.service_fixtures import auth
from tests.stack import Stack, wait_for

pytestmark = pytest.mark.e2e

BAD_FILE = jsonl(TRAIN_ROWS[:2]) + b'{"messages": "not a list"}\n'
# The native fields with no OpenAI field: a small LoRA, short rows, a checkpoint each step.
NATIVE = {
    "method": {"type": "lora", "r": 4, "alpha": 8},
    "hyperparameters": {
        "max_seq_length": 64,
        "eval_every_steps": 1,
        "checkpoint_every_steps": 1,
    },
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_registry_file):
    port = _free_port()
    overrides = {
        "model_registry": str(tiny_registry_file),
        "host": "127.0.0.1",
        "port": port,
        "lease_ttl_seconds": 3.0,
        "reaper_interval_seconds": 1.0,
        "relay_interval_seconds": 1.0,
    }
    deployment = Stack("openai", tmp_path_factory.mktemp("stack-openai"), overrides)
    deployment.setup()
    for command in ("api", "beat", "worker"):
        deployment.start(command)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _healthy(url), timeout=120, what="tuneq api to answer")
    yield deployment, url
    deployment.stop_all()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def url(stack):
    return stack[1]


@pytest.fixture(scope="module")
def keys(stack):
    return stack[0].team_key("team-a"), stack[0].team_key("team-b")


@pytest.fixture(scope="module")
def client(url, keys):
    return openai.OpenAI(base_url=url + "/openai/v1", api_key=keys[0])


@pytest.fixture(scope="module")
def training_file(client):
    return client.files.create(file=("train.jsonl", jsonl(TRAIN_ROWS)), purpose="fine-tune").id


def _create(client, training_file, n_epochs=1, native=NATIVE, **options):
    return client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=training_file,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": n_epochs, "batch_size": 4}},
        },
        extra_body={"tuneq": native},
        **options,
    )


def _finished(client, job_id, timeout=180):
    return wait_for(
        lambda: (job := client.fine_tuning.jobs.retrieve(job_id)).finished_at and job,
        timeout=timeout,
        what=f"job {job_id} to finish",
    )


def test_a_job_trains_to_the_end_through_the_openai_client(stack, url, keys, client, training_file):
    file = client.files.retrieve(training_file)
    assert file.status == "processed" and file.tuneq["examples"] == len(TRAIN_ROWS)

    created = _create(
        client,
        training_file,
        suffix="adder",
        seed=7,
        metadata={"run": "facade"},
    )
    assert created.status == "queued" and created.fine_tuned_model is None

    job = _finished(client, created.id)
    assert job.status == "succeeded", (job.error, stack[0].log("worker")[-3000:])
    assert job.fine_tuned_model == f"ft:tiny-llama:{job.organization_id}:adder:{job.id}"
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.seed == 7 and job.hyperparameters.n_epochs == 1
    assert job.hyperparameters.batch_size == 4 and job.metadata == {"run": "facade"}
    assert job.hyperparameters.learning_rate_multiplier == 1.0  # "auto": the default rate
    assert job.estimated_finish is None and job.error is None

    # Every event once, newest first, across pages; the same as the native list reversed.
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=3))
    assert events[0].message == "job succeeded" and events[-1].message.startswith("job created")
    native = httpx.get(f"{url}/jobs/{job.id}/events?limit=100", headers=auth(keys[0])).json()
    assert [e.id for e in events] == [f"ftevent-{e['id']}" for e in native["data"][::-1]]
    assert {e.type for e in events} == {"message", "metrics"}

    # A checkpoint a step, newest first, one per page when asked.
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id, limit=1))
    steps = [c.step_number for c in checkpoints]
    assert steps == sorted(steps, reverse=True) and steps[-1] == 1, steps
    for checkpoint in checkpoints:
        step = checkpoint.step_number
        assert checkpoint.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{step}"
        assert checkpoint.metrics.step == step and checkpoint.fine_tuning_job_id == job.id
        assert checkpoint.metrics.train_loss > 0 and checkpoint.metrics.valid_loss > 0

    # The adapter the name points at downloads from the native API.
    adapter = httpx.get(
        f"{url}/jobs/{job.id}/artifacts/adapter.tar.gz", headers=auth(keys[0]), timeout=30
    )
    assert adapter.status_code == 200, adapter.text
    with tarfile.open(fileobj=io.BytesIO(adapter.content)) as archive:
        assert "adapter_config.json" in archive.getnames()


def test_jobs_are_listed_page_by_page_and_cancelled(client, training_file):
    # One worker: while the first trains, the others wait in the queue.
    long = _create(client, training_file, n_epochs=50, native={"method": NATIVE["method"]})
    waiting = _create(client, training_file)

    paused = client.fine_tuning.jobs.pause(waiting.id)
    assert paused.status == "queued" and paused.tuneq["status"] == "paused"
    assert client.fine_tuning.jobs.resume(waiting.id).tuneq["status"] == "queued"
    for job in (waiting, long):
        answer = client.fine_tuning.jobs.cancel(job.id)
        assert answer.status in ("cancelled", "running")  # running: the worker stops it
    assert _finished(client, long.id).status == "cancelled"
    assert _finished(client, waiting.id).status == "cancelled"

    first = client.fine_tuning.jobs.list(limit=1)
    assert len(first.data) == 1 and first.has_more
    pages = list(first.iter_pages())
    listed = [job.id for job in first]  # the client follows `after` from page to page
    assert len(pages) == len(listed) >= 3
    assert listed[:2] == [waiting.id, long.id]  # newest first
    assert len(set(listed)) == len(listed)


def test_the_clients_own_exceptions(url, keys, client, training_file):
    with pytest.raises(openai.BadRequestError) as bad_file:
        client.files.create(file=("bad.jsonl", BAD_FILE), purpose="fine-tune")
    assert "line 3" in bad_file.value.message and bad_file.value.param == "file"

    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("job-" + "0" * 26)

    ours = _create(client, training_file)
    client.fine_tuning.jobs.cancel(ours.id)
    other_team = openai.OpenAI(base_url=url + "/openai/v1", api_key=keys[1])
    with pytest.raises(openai.NotFoundError):
        other_team.fine_tuning.jobs.retrieve(ours.id)
    with pytest.raises(openai.NotFoundError):
        other_team.files.retrieve(training_file)

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/openai/v1", api_key="tq_wrong").files.list()
