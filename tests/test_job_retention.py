"""What a finished job keeps: `DELETE /jobs/{id}` (the job and every object it stored gone)
and `prune_checkpoints` (the best and last few checkpoints kept), on SQLite and PostgreSQL
with the real app and a real store."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from tests.api_helpers import DeployedApi, assert_problem, deployed_api, job_spec, upload
from tests.conftest import chat
from tests.service_fixtures import auth, insert_job
from tests.stack import running_stack, trained_job
from tuneq.db import make_sessionmaker, transaction
from tuneq.jobs.models import Job, JobArtifact, JobCheckpoint, JobEvent, JobMetric, OutboxMessage
from tuneq.jobs.retention import job_prefix, prune_checkpoints
from tuneq.jobs.schemas import checkpoint_artifact_name
from tuneq.jobs.states import JobState
from tuneq.storage import ObjectStore, open_store
from tuneq.teams.models import Team


@dataclass
class World:
    api: DeployedApi
    store: ObjectStore

    @property
    def engine(self) -> Engine:
        return self.api.engine

    def team_id(self, name: str) -> str:
        with self.engine.connect() as connection:
            return connection.scalar(select(Team.id).where(Team.name == name))

    def finished_job(self, team: str, steps: tuple[int, ...], best: int | None) -> str:
        """A succeeded job with an adapter, diagnostics, a checkpoint per step (files and
        tarball in the store), events and metrics: what a worker leaves."""
        sessions = make_sessionmaker(self.engine)
        job_id = insert_job(sessions, team_id=self.team_id(team), state=JobState.SUCCEEDED)
        attempt = f"{job_prefix(job_id)}attempts/1"
        with transaction(sessions) as db:
            db.get(Job, job_id).result = {"best_step": best}
            for name, kind in (("adapter.tar.gz", "adapter"), ("diagnostics.jsonl", "diagnostics")):
                self.store.put_bytes(f"{attempt}/{name}", b"x")
                db.add(_artifact(job_id, name, kind, None, f"{attempt}/{name}"))
            for step in steps:
                prefix = f"{attempt}/checkpoint-{step}"
                self.store.put_bytes(f"{prefix}/adapter_model.safetensors", b"w")
                self.store.put_bytes(f"{prefix}/{checkpoint_artifact_name(step)}", b"t")
                db.add(JobCheckpoint(job_id=job_id, attempt=1, step=step, storage_prefix=prefix))
                db.add(_artifact(job_id, checkpoint_artifact_name(step), "checkpoint", step,
                                 f"{prefix}/{checkpoint_artifact_name(step)}"))  # fmt: skip
                db.add(JobMetric(job_id=job_id, attempt=1, step=step, kind="train",
                                 values={"train_loss": 1.0}))  # fmt: skip
            db.add(JobEvent(job_id=job_id, type="message", level="info", message="job succeeded"))
        return job_id

    def rows(self, model: Any, job_id: str) -> int:
        with self.engine.connect() as connection:
            return connection.scalar(
                select(func.count()).select_from(model).where(model.job_id == job_id)
            )

    def stored(self, job_id: str) -> list[str]:
        return [key for key in _keys(self.store, job_prefix(job_id))]


def _artifact(job_id: str, name: str, kind: str, step: int | None, key: str) -> JobArtifact:
    return JobArtifact(job_id=job_id, name=name, kind=kind, step=step, storage_key=key,
                       bytes=1, sha256="0" * 64)  # fmt: skip


def _keys(store: ObjectStore, prefix: str) -> list[str]:
    # The local store: what lies under its directory for the prefix.
    directory = store.root / prefix  # type: ignore[attr-defined]
    return sorted(str(p.relative_to(store.root)) for p in directory.rglob("*") if p.is_file())


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request, tmp_path_factory, tiny_registry_file) -> Iterator[World]:
    home = tmp_path_factory.mktemp(f"retention-{request.param}")
    with deployed_api(request.param, home, tiny_registry_file, "team-a", "team-b") as api:
        yield World(api, open_store(api.settings))


def test_deleting_a_finished_job_removes_it_and_everything_it_stored(world):
    job_id = world.finished_job("team-a", steps=(2, 4), best=4)
    key_a, key_b = world.api.keys
    client = world.api.client
    assert len(world.stored(job_id)) == 6

    assert_problem(client.delete(f"/jobs/{job_id}", headers=auth(key_b)), 404)  # not theirs
    assert len(world.stored(job_id)) == 6

    response = client.delete(f"/jobs/{job_id}", headers=auth(key_a))
    assert response.status_code == 200, response.text
    assert response.json() == {"id": job_id, "object": "job", "deleted": True}
    assert world.stored(job_id) == []
    for model in (Job, JobEvent, JobMetric, JobCheckpoint, JobArtifact):
        column = Job.id if model is Job else model.job_id
        with world.engine.connect() as connection:
            assert connection.scalar(select(func.count()).where(column == job_id)) == 0, model
    assert_problem(client.get(f"/jobs/{job_id}", headers=auth(key_a)), 404)
    assert_problem(client.delete(f"/jobs/{job_id}", headers=auth(key_a)), 404)


@pytest.mark.parametrize("state", [JobState.QUEUED, JobState.RUNNING, JobState.PAUSED])
def test_a_job_that_can_still_run_is_not_deleted(world, state):
    sessions = make_sessionmaker(world.engine)
    job_id = insert_job(sessions, team_id=world.team_id("team-a"), state=state)
    with transaction(sessions) as db:
        db.add(OutboxMessage(job_id=job_id))
    problem = assert_problem(
        world.api.client.delete(f"/jobs/{job_id}", headers=auth(world.api.keys[0])), 409
    )
    assert problem["param"] == "job_id" and "cancel it first" in problem["detail"]
    assert world.rows(OutboxMessage, job_id) == 1
    with world.engine.connect() as connection:
        assert connection.scalar(select(Job.state).where(Job.id == job_id)) == state


@pytest.mark.parametrize(
    ("keep_last", "best", "left"),
    [(1, 4, [4, 8]), (2, 8, [6, 8]), (0, 2, [2]), (1, None, [8]), (9, 2, [2, 4, 6, 8])],
)
def test_pruning_keeps_the_best_and_the_last_checkpoints(world, keep_last, best, left):
    job_id = world.finished_job("team-a", steps=(2, 4, 6, 8), best=best)
    sessions = make_sessionmaker(world.engine)

    gone = prune_checkpoints(
        sessions=sessions, store=world.store, job_id=job_id, keep_last=keep_last
    )

    assert gone == sorted({2, 4, 6, 8} - set(left))
    with world.engine.connect() as connection:
        kept = connection.scalars(select(JobCheckpoint.step).where(JobCheckpoint.job_id == job_id))
        names = connection.scalars(select(JobArtifact.name).where(JobArtifact.job_id == job_id))
        assert sorted(kept) == left
        assert sorted(names) == sorted(
            ["adapter.tar.gz", "diagnostics.jsonl", *map(checkpoint_artifact_name, left)]
        )
    stored = world.stored(job_id)
    for step in (2, 4, 6, 8):
        has = any(f"checkpoint-{step}/" in key for key in stored)
        assert has == (step in left), (step, stored)
    assert any(key.endswith("adapter.tar.gz") for key in stored)


def test_a_worker_keeps_only_the_best_and_last_checkpoints_when_told(tmp_path, tiny_registry_file):
    overrides = {"model_registry": str(tiny_registry_file), "keep_checkpoints": 1}
    rows = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(16)]
    with running_stack("embedded", tmp_path / "stack", overrides) as stack:
        stack.start("worker")
        key = stack.team_key("keepers")
        with stack.client() as api:
            training_file = upload(api, key, rows)
            spec = job_spec(training_file, validation_split=0.25)  # 12 chats: 3 steps an epoch
            spec["hyperparameters"] |= {
                "n_epochs": 3, "eval_every_steps": 1, "checkpoint_every_steps": 2,
                "early_stopping": None,
            }  # fmt: skip
            job = trained_job(stack, api, key, spec)
            kept = api.get(f"/jobs/{job['id']}/checkpoints", headers=auth(key)).json()["data"]
            events = api.get(f"/jobs/{job['id']}/events", headers=auth(key)).json()["data"]
        written = [2, 4, 6, 8]  # every 2 steps before the last (9)
        best = job["result"]["best_step"]
        left = sorted({8} | ({best} & set(written)))
        assert [c["step"] for c in kept] == left
        store = open_store(stack.settings)
        stored = _keys(store, job_prefix(job["id"]))
        for step in written:
            assert any(f"checkpoint-{step}/" in k for k in stored) == (step in left), stored
        notes = [e["message"] for e in events if "TUNEQ_KEEP_CHECKPOINTS" in e["message"]]
        gone = sorted(set(written) - set(left))
        assert notes == [f"deleted the checkpoints of steps {gone} (TUNEQ_KEEP_CHECKPOINTS=1)"]
