"""The job use cases called without HTTP, as a facade or a CLI would call them, and the state
machine's table as the one truth about status changes, on SQLite and on PostgreSQL.

`/jobs` through the app is tested in test_api_jobs; here: that a use case publishes only
after its commit and a replay publishes nothing, and that a move outside TRANSITIONS
writes nothing, whoever asks for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from tests.api_helpers import TRAIN_ROWS, deployment, job_spec, upload
from tests.service_fixtures import api_client, new_team_key
from tuneq.db import transaction
from tuneq.errors import Conflict
from tuneq.jobs import service
from tuneq.jobs.lease import claim_job, fenced_update
from tuneq.jobs.models import Job, OutboxMessage
from tuneq.jobs.states import TRANSITIONS, JobState, move_to
from tuneq.queue import relay_now
from tuneq.teams.models import Team
from tuneq.teams.service import authenticate


@dataclass
class Env:
    client: TestClient
    team: Team
    training_file: str

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self.client.app.state.sessions

    def submit(self, body: dict[str, Any], **options: Any) -> service.Submission:
        state = self.client.app.state
        return service.submit_job(
            sessions=state.sessions,
            store=state.store,
            settings=state.settings,
            registry=state.registry,
            broker=state.celery,
            team=self.team,
            body=body,
            **options,
        )

    def unsent(self, job_id: str) -> int:
        with self.sessions() as db:
            return db.scalar(
                select(func.count()).where(
                    OutboxMessage.job_id == job_id, OutboxMessage.sent_at.is_(None)
                )
            )


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def env(request, tmp_path_factory, tiny_registry_file) -> Iterator[Env]:
    home = tmp_path_factory.mktemp(f"job-service-{request.param}")
    with deployment(request.param, home, tiny_registry_file) as settings:
        key = new_team_key(settings, "team-service")
        with api_client(settings) as client:
            with client.app.state.sessions() as db:
                team = authenticate(db=db, key=key).team
            yield Env(client, team, upload(client, key, TRAIN_ROWS))


class Deferred:
    """A `defer` that keeps what it was given, to run it when the test says."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def __call__(self, task: Any, *args: Any) -> None:
        self.calls.append((task, args))

    def run(self) -> None:
        for task, args in self.calls:
            task(*args)


def test_submit_publishes_after_its_commit_and_a_replay_publishes_nothing(env: Env) -> None:
    spec = job_spec(env.training_file, suffix="service-submit")
    deferred = Deferred()
    created = env.submit(spec, idempotency_key="service-submit-1", defer=deferred)
    assert created.status == 201 and created.body["status"] == "queued"
    job_id = created.body["id"]
    assert [task for task, _ in deferred.calls] == [relay_now]
    assert env.unsent(job_id) == 1  # committed, and not yet published
    deferred.run()
    assert env.unsent(job_id) == 0

    replayed = Deferred()
    again = env.submit(spec, idempotency_key="service-submit-1", defer=replayed)
    assert (again.status, again.body) == (201, created.body) and replayed.calls == []

    dry = Deferred()
    estimate = env.submit(spec, dry_run=True, defer=dry)
    assert estimate.status == 200 and estimate.body["object"] == "job.estimate"
    assert dry.calls == []


def test_steering_owns_its_transaction_and_only_resume_publishes(env: Env) -> None:
    job_id = env.submit(job_spec(env.training_file), defer=Deferred()).body["id"]
    steer = {"sessions": env.sessions, "team": env.team, "job_id": job_id}
    assert service.pause_job(**steer).status == "paused"
    deferred = Deferred()
    state = env.client.app.state
    resumed = service.resume_job(
        **steer, settings=state.settings, broker=state.celery, defer=deferred
    )
    assert resumed.status == "queued" and [task for task, _ in deferred.calls] == [relay_now]
    assert service.cancel_job(**steer).status == "cancelled"
    with pytest.raises(Conflict):
        service.resume_job(**steer, settings=state.settings, broker=state.celery, defer=deferred)
    assert len(deferred.calls) == 1  # a refused resume committed nothing to publish
    with env.sessions() as db:
        assert db.get(Job, job_id).state == JobState.CANCELLED


def test_every_move_outside_the_table_writes_nothing(env: Env) -> None:
    job_id = env.submit(job_spec(env.training_file), defer=Deferred()).body["id"]
    for source in JobState:
        for target in JobState:
            with transaction(env.sessions) as db:
                # Put the job in `source` the way no service may: a test's own write.
                db.execute(update(Job).where(Job.id == job_id).values(state=source))
                moved = db.execute(move_to(target, Job.id == job_id)).rowcount
                state = db.scalar(select(Job.state).where(Job.id == job_id))
            legal = target in TRANSITIONS[source]
            assert moved == (1 if legal else 0), (source, target)
            assert state == (target if legal else source), (source, target)


def test_a_worker_cannot_write_a_move_the_table_refuses(env: Env) -> None:
    job_id = env.submit(job_spec(env.training_file), defer=Deferred()).body["id"]
    with transaction(env.sessions) as db:
        claim = claim_job(db, job_id=job_id, owner="w1", lease_ttl=30)
    assert claim is not None
    with transaction(
        env.sessions
    ) as db:  # cancelling comes first: running → cancelled is not a move
        assert fenced_update(db, claim, state=JobState.CANCELLED) is False
    with env.sessions() as db:
        assert db.get(Job, job_id).state == JobState.RUNNING
    with transaction(env.sessions) as db:
        assert fenced_update(db, claim, state=JobState.PAUSED, lease_owner=None) is True
    with env.sessions() as db:
        job = db.get(Job, job_id)
        assert job.state == JobState.PAUSED and job.lease_owner is None
