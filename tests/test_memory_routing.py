"""Routing by memory (tuneq/jobs/routing.py): with TUNEQ_GPU_QUEUE_MEMORY_GIB set, a job goes
to the smallest GPU queue its estimated peak fits, and one that fits none is refused at
`POST /jobs` with the numbers. The queues' sizes are set around the tiny Llama's own estimate,
read from a dry run on a deployment without GPU queues."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from tests.api_helpers import assert_problem, job_spec
from tests.conftest import chat
from tests.service_fixtures import api_client, auth, make_settings, migrate, new_team_key
from tests.test_queue_routing import _messages
from tuneq.db import make_engine, make_sessionmaker
from tuneq.jobs.models import Job
from tuneq.jobs.routing import GIB, size

ROWS = "".join(json.dumps(chat(f"q{i}", f"a{i}")) + "\n" for i in range(8)).encode()


class Deployment:
    def __init__(self, home, registry, queues_gib):
        self.settings = make_settings(
            home, model_registry=str(registry), gpu_queue_memory_gib=queues_gib
        )
        migrate(self.settings)
        self.key = new_team_key(self.settings, "team")

    def submit(self, dry_run: bool = False, **hyperparameters):
        with api_client(self.settings) as client:
            upload = client.post(
                "/files", headers=auth(self.key), files={"file": ("t.jsonl", ROWS)}
            )
            spec = job_spec(upload.json()["id"], validation_split=0.0)
            spec["hyperparameters"] |= hyperparameters
            path = "/jobs?dry_run=true" if dry_run else "/jobs"
            return client.post(path, headers=auth(self.key), json=spec)

    def jobs(self) -> int:
        engine = make_engine(self.settings.resolved_database_url)
        with make_sessionmaker(engine)() as db:
            count = db.scalar(select(func.count()).select_from(Job))
        engine.dispose()
        return count


@pytest.fixture(scope="module")
def memory(tmp_path_factory, tiny_registry_file):
    """The tiny Llama job's memory estimate, from a dry run."""
    home = tmp_path_factory.mktemp("estimate")
    response = Deployment(home, tiny_registry_file, None).submit(dry_run=True)
    assert response.status_code == 200, response.text
    return response.json()["estimate"]["memory"]


def test_a_job_goes_to_the_smallest_gpu_queue_it_fits(tmp_path, tiny_registry_file, memory):
    peak = memory["peak_bytes"]
    queues = {"large": 4 * peak / GIB, "small": 0.5 * peak / GIB, "medium": 1.5 * peak / GIB}
    deployment = Deployment(tmp_path, tiny_registry_file, queues)

    created = deployment.submit(gradient_checkpointing=False)

    assert created.status_code == 201, created.text
    assert _messages(deployment.settings, "medium") == [[created.json()["id"]]]
    for other in ("small", "large", "training"):  # nor the registry's queue
        assert _messages(deployment.settings, other) == []


def test_a_job_that_fits_no_queue_is_refused_with_the_numbers(tmp_path, tiny_registry_file, memory):
    smallest_need = memory["peak_bytes_by_checkpointing"]["on"]
    queues = {"l4": 0.5 * smallest_need / GIB, "a100": 0.9 * smallest_need / GIB}
    deployment = Deployment(tmp_path, tiny_registry_file, queues)

    for dry_run in (False, True):
        body = assert_problem(deployment.submit(dry_run=dry_run), 422)
        assert body["code"] == "insufficient_gpu_memory" and body["param"] == "model"
        assert body["peak_bytes"] == memory["peak_bytes"]
        assert body["queue_memory_bytes"] == {q: int(g * GIB) for q, g in queues.items()}
        assert size(memory["peak_bytes"]) in body["detail"]
        assert f"a100, has: {size(queues['a100'] * GIB)}" in body["detail"]
        assert body["errors"] == [{"message": body["detail"], "field": "model"}]
    assert deployment.jobs() == 0


def test_a_job_that_fits_only_with_checkpointing_is_told_so_and_fits_with_it_or_auto(
    tmp_path, tiny_registry_file, memory
):
    off, on = (
        memory["peak_bytes_by_checkpointing"]["off"],
        memory["peak_bytes_by_checkpointing"]["on"],
    )
    assert on < off
    deployment = Deployment(tmp_path, tiny_registry_file, {"gpu": (on + off) / 2 / GIB})

    body = assert_problem(deployment.submit(gradient_checkpointing=False), 422)
    assert body["param"] == "hyperparameters.gradient_checkpointing"
    assert f"with gradient_checkpointing true it needs {size(on)}" in body["detail"]

    created = deployment.submit(gradient_checkpointing=True)
    assert created.status_code == 201, created.text
    assert created.json()["estimate"]["memory"]["peak_bytes"] == on
    # "auto" (the default): the worker turns it on on this GPU, so the job fits it too
    automatic = deployment.submit()
    assert automatic.status_code == 201, automatic.text
    assert _messages(deployment.settings, "gpu") == [
        [created.json()["id"]],
        [automatic.json()["id"]],
    ]
