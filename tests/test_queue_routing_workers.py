"""Routing with real workers: two `tuneq worker` processes, each on its own queue (a model's
registry entry names the queue: a GPU type), take only their own queue's jobs, at once.

tests/test_queue_routing.py checks that a job is published to its model's queue; this runs
the production stack (PostgreSQL, Redis, S3, beat) with one worker on `a100` and one on the
default `training` queue. Which worker ran a job is its "attempt N started on HOST:PID"
event; when it ran is its row's started_at/finished_at, by the database's clock.
"""

from __future__ import annotations

import re
from datetime import datetime

import pytest
from sqlalchemy import select

from tests.api_helpers import job_spec, jsonl
from tests.conftest import chat, write_registry
from tests.service_fixtures import auth
from tests.stack import all_events, job_ended, running_stack, wait_for
from tuneq.db import make_engine, make_sessionmaker
from tuneq.models import Job

ROWS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(40)]
STARTED_ON = re.compile(r"^attempt (\d+) started on (\S+):(\d+)$")
WORKERS = {"a100": "tiny-llama-a100", "training": "tiny-llama"}  # queue -> its model


@pytest.fixture
def two_queue_registry(tmp_path, tiny_model_dir):
    source = {"type": "local", "path": str(tiny_model_dir)}
    return write_registry(
        tmp_path / "models.json",
        {
            "tiny-llama": {"source": source, "tasks": ["causal_lm"]},
            "tiny-llama-a100": {"source": source, "tasks": ["causal_lm"], "queue": "a100"},
        },
    )


def _worker_pids(api, key: str, job_id: str) -> list[int]:
    """The process id of the worker of each of the job's attempts, from its events."""
    found = [STARTED_ON.match(event["message"]) for event in all_events(api, key, job_id)]
    return [int(match.group(3)) for match in found if match]


def _overlap(a: tuple[datetime, datetime], b: tuple[datetime, datetime]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.mark.e2e
def test_two_workers_on_two_queues_take_only_their_own_jobs_at_the_same_time(
    tmp_path, two_queue_registry
):
    overrides = {"model_registry": str(two_queue_registry), "relay_interval_seconds": 1.0}
    with running_stack("production", tmp_path / "stack", overrides) as stack:
        key = stack.team_key("routing")
        pids = {
            queue: stack.start(
                "worker",
                f"worker-{queue}",
                env={"OMP_NUM_THREADS": "1"},
                args=("--queues", queue, "--name", f"{queue}@%h"),
            ).pid
            for queue in WORKERS
        }
        for queue in WORKERS:
            wait_for(
                lambda q=queue: "ready" in stack.log(f"worker-{q}"), timeout=120, what="workers"
            )
        with stack.client() as api:
            training = api.post(
                "/files", headers=auth(key), files={"file": ("t.jsonl", jsonl(ROWS))}
            )
            assert training.status_code == 201, training.text

            def submit(model: str, epochs: int) -> str:
                spec = job_spec(training.json()["id"], model=model, validation_split=0.0)
                spec["hyperparameters"] |= {"n_epochs": epochs, "checkpoint_every_steps": 1000}
                created = api.post("/jobs", headers=auth(key), json=spec)
                assert created.status_code == 201, created.text
                return created.json()["id"]

            # a100's first job runs longest; training's is shorter, so that its worker is
            # idle while a100's second job waits for the a100 worker: it must not take it
            a100_first = submit(WORKERS["a100"], 6)
            training_job = submit(WORKERS["training"], 3)
            a100_second = submit(WORKERS["a100"], 1)
            jobs = {a100_first: "a100", training_job: "training", a100_second: "a100"}

            for job_id in jobs:
                ended = job_ended(api, key, job_id, timeout=300)
                assert ended["status"] == "succeeded", (ended, stack.log(f"worker-{jobs[job_id]}"))
            ran_on = {job_id: _worker_pids(api, key, job_id) for job_id in jobs}

        engine = make_engine(stack.settings.resolved_database_url)
        with make_sessionmaker(engine)() as db:
            rows = {
                row.id: row for row in db.scalars(select(Job).where(Job.id.in_(list(jobs)))).all()
            }
        engine.dispose()

    # each job ran once, on the worker of its model's queue
    for job_id, queue in jobs.items():
        assert rows[job_id].queue == queue
        assert rows[job_id].attempt == 1
        assert ran_on[job_id] == [pids[queue]], (queue, ran_on, pids)
    # the two workers trained at the same time: the running intervals overlap
    interval = {job_id: (rows[job_id].started_at, rows[job_id].finished_at) for job_id in jobs}
    assert _overlap(interval[a100_first], interval[training_job]), interval
    # one job at a time on the a100 worker: its second job started after its first ended
    assert interval[a100_second][0] >= interval[a100_first][1], interval
